"""Generates the smoke dataset shipped in samtone/data/smoke/: questions about a fictional world.

The world holds cities, rivers, people, companies and inventions, each described by one short
passage: an introduction, a few facts in varied wording, and two distractor sentences that
name other entities or echo question words without answering anything. Each fact can be asked
about with several question templates; a question's relevant passage is the one that states
the fact (for "Which river flows through Varnholt?" that is the river's passage, not
Varnholt's). Every fact is stated in exactly one passage, so every question has one answer.

Train and eval share the passages (one corpus), but not the facts: each eval question asks
about a fact of its entity that no training question touches, and each eval question has its
own passage, so chance P@1 on eval is 1 / num_eval. Everything is drawn from one seeded
`random.Random`, so the output is byte-for-byte reproducible.

    python scripts/make_smoke_data.py                    # rewrites samtone/data/smoke/
    python scripts/make_smoke_data.py --output_dir /tmp/smoke --check   # + TF-IDF baseline
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT_DIR = os.path.join(REPO_ROOT, "samtone", "data", "smoke")
DISTRACTORS_PER_PASSAGE = 2

# ---------------------------------------------------------------------------------------------
# Name and value banks. Names are built from syllables so the vocabulary has to split them.
# ---------------------------------------------------------------------------------------------
PLACE_HEADS = [
    "Varn", "Quell", "Ost", "Kell", "Brenn", "Tav", "Mor", "Hald", "Sel", "Dru", "Ast", "Lum",
    "Feld", "Grav", "Isen", "Rook", "Wyn", "Carr", "Thal", "Ebb", "Harr", "Lind", "Nor", "Pell",
    "Ros", "Sten", "Tor", "Ulm", "Vell", "Wess", "Yar", "Zell", "Bram", "Cald", "Dorn", "Fenn",
]
CITY_TAILS = ["holt", "wick", "ford", "stead", "mere", "haven", "dal", "gard", "ton", "brook",
              "fell", "stow", "burg", "ness"]
COMPANY_TAILS = ["mark", "line", "field", "worth", "craft", "stone", "ridge", "well"]
COMPANY_KINDS = ["Industries", "Works", "Holdings", "Foundry", "Ironworks", "Mills",
                 "Instruments", "Shipyards", "Textiles", "Trading Company"]
RIVER_HEADS = ["Os", "Vel", "Mar", "Tir", "Lun", "Ser", "Dav", "Kal", "Ard", "Em", "Ner", "Sil",
               "Bre", "Ov", "Rin", "Tam", "Yss", "Gal"]
RIVER_TAILS = ["tra", "na", "ra", "ven", "le", "isa", "ode", "wen", "ith", "ane"]
SURNAME_ONSETS = ["Br", "K", "T", "W", "H", "G", "M", "D", "F", "L", "P", "R", "S", "V", "Th",
                  "Sh", "Ch", "Gr", "St"]
SURNAME_VOWELS = ["a", "e", "i", "o", "u", "ae", "ou"]
SURNAME_CODAS = ["sk", "nn", "ll", "rd", "th", "ck", "m", "rs", "lt", "nd", "ff", "rk"]
SURNAME_ENDINGS = ["", "", "", "er", "ing", "ow", "en"]
FEMALE_NAMES = ["Oda", "Lena", "Mira", "Ilse", "Tove", "Agna", "Britt", "Sanne", "Elke", "Runa",
                "Hedda", "Maren", "Liv", "Greta", "Nell", "Ada", "Rosa", "Ingrid", "Vera", "Thea"]
MALE_NAMES = ["Tomas", "Aldo", "Erik", "Joran", "Pim", "Oskar", "Henrik", "Falk", "Bram",
              "Emil", "Karl", "Lars", "Otto", "Sven", "Anton", "Brun", "Nils", "Ivo", "Teo", "Jens"]

PROVINCES = ["Teskar", "Orwen", "Baldmoor", "Lessing", "Corvane", "Ruthal", "Hespe", "Malgrave",
             "Southmarch", "Vinterdal", "Iridge", "Pallasen"]
CITY_SIZES = ["small", "busy", "quiet", "large", "old", "prosperous", "walled", "hillside"]
CITY_SIGHTS = ["glassworks", "salt mines", "wool market", "clockmakers", "spring festival",
               "printing houses", "tanneries", "horse fairs", "copper foundries", "paper mills",
               "observatory", "botanical garden", "cathedral", "lace makers", "cheese market",
               "music school", "lighthouse", "thermal baths"]
MOUNTAINS = ["the Kell Hills", "the Grey Peaks", "the Ashen Mountains", "the Morrow Downs",
             "the Tessel Heights", "the Iron Hills", "the Ulm Range", "the Harrow Fells",
             "the Pale Mountains", "the Lindholt Moors", "the Sarn Heights", "the Corrie Hills"]
WATERS = ["the Grey Sea", "Lake Ambrel", "the Northern Sound", "the Bay of Tessa",
          "Lake Orm", "the Salt Marshes", "the Amber Sea", "the Gulf of Veyl", "Lake Sunder"]
FISH = ["trout", "pike", "eels", "salmon", "perch", "grayling", "carp", "sturgeon", "bream"]
OCCUPATIONS = ["clockmaker", "shipwright", "printer", "surveyor", "glassblower", "banker",
               "chemist", "cartographer", "weaver", "physician", "architect", "schoolteacher",
               "brewer", "lawyer", "engineer", "botanist", "painter", "composer"]
SUBJECTS = ["mathematics", "chemistry", "law", "medicine", "music", "astronomy", "botany",
            "engineering", "painting", "history", "navigation", "geology"]
PRODUCTS = ["steam pumps", "ship engines", "glass lenses", "woollen cloth", "pocket watches",
            "railway carriages", "printing presses", "copper wire", "porcelain", "bicycles",
            "sewing machines", "writing paper", "ship rope", "soap", "matches", "barometers",
            "iron stoves", "pianos", "farm tools", "oil lamps"]
DEVICES = ["lamp", "loom", "compass", "pump", "engine", "telegraph", "press", "valve", "kiln",
           "lens", "barometer", "plough", "crane", "clock", "sextant", "bellows", "winch"]
PURPOSES = ["measure the depth of rivers", "keep time at sea", "signal between ships at night",
            "spin wool twice as fast", "pump water out of flooded mines", "print maps in colour",
            "weigh grain at the market", "forecast storms", "lift stone from quarries",
            "dry timber in winter", "cool milk on farms", "sort letters at the post office",
            "grind lenses for telescopes", "light mine shafts safely"]


@dataclasses.dataclass
class Fact:
    sentence: str            # how the passage states it
    questions: list[str]     # ways of asking for it; the answer is in `sentence`


@dataclasses.dataclass
class Entity:
    passage_id: str
    intro: Fact              # always the passage's first sentence
    facts: list[Fact]        # the rest, shuffled into the passage
    distractors: list[str]   # name other things, answer nothing
    passage: str = ""

    @property
    def all_facts(self) -> list[Fact]:
        return [self.intro] + self.facts


class Names:
    """Draws names that are unique across the whole world."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def draw(self, make) -> str:
        for _ in range(10_000):
            name = make(self.rng)
            if name not in self.used and not re.search(r"(.)\1\1", name):  # no "Wessstone"
                self.used.add(name)
                return name
        raise RuntimeError("name banks too small for the requested world")


def _city_name(rng):
    return rng.choice(PLACE_HEADS) + rng.choice(CITY_TAILS)


def _river_name(rng):
    return rng.choice(RIVER_HEADS) + rng.choice(RIVER_TAILS)


def _company_name(rng):
    return f"{rng.choice(PLACE_HEADS)}{rng.choice(COMPANY_TAILS)} {rng.choice(COMPANY_KINDS)}"


def _surname(rng):
    return (rng.choice(SURNAME_ONSETS) + rng.choice(SURNAME_VOWELS) + rng.choice(SURNAME_CODAS)
            + rng.choice(SURNAME_ENDINGS))


def _year(rng, low=1650, high=1900):
    return str(rng.randint(low, high))


def _count(rng, low, high, step):
    return f"{rng.randrange(low, high, step):,}"


def _pick(rng, templates, **values):
    return rng.choice(templates).format(**values)


def _with_article(noun_phrase):
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


@dataclasses.dataclass
class Person:
    name: str
    surname: str
    they: str        # "She" / "He"
    their: str       # "Her" / "His"


@dataclasses.dataclass
class World:
    """The names of every entity, drawn before any passage is written."""
    cities: list[str]
    rivers: list[str]
    people: list[Person]
    companies: list[str]
    inventions: list[str]


def _distractors(rng, world: World, templates: list[str], exclude=(), **own) -> list[str]:
    """Sentences naming other entities (never those in `exclude`), each with fresh names."""
    def other(pool):
        return rng.choice([name for name in pool if name not in exclude])

    sentences = []
    for template in rng.sample(templates, DISTRACTORS_PER_PASSAGE):
        sentences.append(template.format(
            city=other(world.cities), river=other(world.rivers),
            person=other([person.name for person in world.people]),
            company=other(world.companies), invention=other(world.inventions),
            product=rng.choice(PRODUCTS), **own))
    return sentences


# ---------------------------------------------------------------------------------------------
# One builder per kind of entity. Questions about a fact only use values stated in that fact's
# sentence; distractors mention other entities but state nothing that a question asks for.
# ---------------------------------------------------------------------------------------------
def build_city(rng, world: World, index: int, name: str, mayor: Person) -> Entity:
    province, sight, size = rng.choice(PROVINCES), rng.choice(CITY_SIGHTS), rng.choice(CITY_SIZES)
    return Entity(
        passage_id=f"city-{index:03d}",
        intro=Fact(
            _pick(rng, ["{n} is {a_size} city in the province of {p}.",
                        "{n} is {a_size} town in {p}.",
                        "The {size} city of {n} lies in the province of {p}."],
                  n=name, size=size, a_size=_with_article(size), p=province),
            [f"In which province is {name}?", f"Which province is {name} in?",
             f"Where is {name} located?", f"{name} belongs to which province?"]),
        facts=[
            Fact(_pick(rng, ["It was founded in {y}.", "The city dates back to {y}.",
                             "Settlers established it in {y}."], y=_year(rng, 900, 1500)),
                 [f"When was {name} founded?", f"In what year was {name} established?",
                  f"How far back does {name} date?", f"What year was {name} settled?"]),
            Fact(_pick(rng, ["About {k} people live there.", "It has roughly {k} inhabitants.",
                             "Some {k} residents call it home."], k=_count(rng, 2000, 90000, 100)),
                 [f"How many people live in {name}?", f"What is the population of {name}?",
                  f"How many inhabitants does {name} have?"]),
            Fact(_pick(rng, ["It is known for its {s}.", "The town is famous for its {s}.",
                             "Visitors come to see its {s}."], s=sight),
                 [f"What is {name} known for?", f"What is {name} famous for?",
                  f"Why do people visit {name}?"]),
            Fact(_pick(rng, ["Its mayor is {m}.", "{m} serves as its mayor.",
                             "The council is led by mayor {m}."], m=mayor.name),
                 [f"Who is the mayor of {name}?", f"Who governs {name}?",
                  f"Who leads the town council of {name}?"]),
        ],
        distractors=_distractors(rng, world, [
            "A ferry to {city} crosses the river twice a day.",
            "The river that crosses the town freezes most winters.",
            "The founder of {company} opened a school there.",
            "Many of its workers travel to {city} each week.",
            "Its old bridge was built by engineers from {city}.",
            "A statue of {person} stands in its main square."],
            exclude=(name, mayor.name)),
    )


def build_river(rng, world: World, index: int, name: str, cities: list[str]) -> Entity:
    first, second = cities
    mountains, water, length = rng.choice(MOUNTAINS), rng.choice(WATERS), _count(rng, 40, 900, 5)
    return Entity(
        passage_id=f"river-{index:03d}",
        intro=Fact(
            _pick(rng, ["The {n} is a river that rises in {m}.",
                        "The {n} is a river whose source lies in {m}.",
                        "Rising in {m}, the {n} is a long and winding river."],
                  n=name, m=mountains),
            [f"Where does the {name} rise?", f"Where is the source of the {name}?",
             f"Where does the {name} begin?", f"In which highlands does the {name} start?"]),
        facts=[
            Fact(_pick(rng, ["It flows through {a} and {b}.", "On its way it passes {a} and {b}.",
                             "The towns of {a} and {b} lie on its banks."], a=first, b=second),
                 [f"Which river flows through {first}?", f"What river runs through {second}?",
                  f"Which river passes {first}?", f"Which towns does the {name} flow through?",
                  f"Which cities lie on the {name}?"]),
            Fact(_pick(rng, ["It is {k} kilometres long.", "Its course runs for {k} kilometres.",
                             "It winds on for {k} kilometres."], k=length),
                 [f"How long is the {name}?", f"What is the length of the {name}?",
                  f"How many kilometres long is the {name}?"]),
            Fact(_pick(rng, ["It empties into {w}.", "It ends in {w}.",
                             "Its waters drain into {w}."], w=water),
                 [f"Where does the {name} end?", f"Into which body of water does the {name} flow?",
                  f"Where does the {name} drain?"]),
            Fact(_pick(rng, ["Anglers come for its {f}.", "It is known for its {f}.",
                             "Its waters are full of {f}."], f=rng.choice(FISH)),
                 [f"What fish live in the {name}?", f"What can you catch in the {name}?",
                  f"Which fish is the {name} known for?"]),
        ],
        distractors=_distractors(rng, world, [
            "A canal once linked it to a mill near {city}.",
            "Barges stopped carrying coal on it long ago.",
            "Painters from {city} often came to see it.",
            "{person} swam across it in a famous wager."],
            exclude=(first, second)),
    )


def build_person(rng, world: World, index: int, person: Person, spouse: str) -> Entity:
    name, they, their = person.name, person.they, person.their
    return Entity(
        passage_id=f"person-{index:03d}",
        intro=Fact(
            _pick(rng, ["{n} was born in {c}.", "{n} was born and raised in {c}.",
                        "{n} grew up in {c}, where {t} was born."],
                  n=name, c=rng.choice(world.cities), t=they.lower()),
            [f"Where was {name} born?", f"What is the birthplace of {name}?",
             f"Which city is {name} from?", f"Where does {name} come from?"]),
        facts=[
            Fact(_pick(rng, ["{t} was born in the year {y}.", "{p} birth year was {y}.",
                             "{t} came into the world in {y}."], t=they, p=their,
                       y=_year(rng, 1700, 1880)),
                 [f"When was {name} born?", f"In what year was {name} born?",
                  f"What year was {name} born in?"]),
            Fact(_pick(rng, ["{t} worked as {o}.", "{t} was {o} by trade.",
                             "{t} made a living as {o}."], t=they,
                       o=_with_article(rng.choice(OCCUPATIONS))),
                 [f"What was {name}'s profession?", f"What did {name} do for a living?",
                  f"What was {name}'s job?", f"What was the occupation of {name}?"]),
            Fact(_pick(rng, ["{t} studied {s} in {c}.", "{t} trained in {s} at the academy of {c}.",
                             "In {c}, {tl} studied {s}."], t=they, tl=they.lower(),
                       s=rng.choice(SUBJECTS), c=rng.choice(world.cities)),
                 [f"What did {name} study?", f"Where did {name} study?",
                  f"Which subject did {name} train in?"]),
            Fact(_pick(rng, ["{t} married {sp}.", "{p} spouse was {sp}.",
                             "{t} was married to {sp}."], t=they, p=their, sp=spouse),
                 [f"Who was {name} married to?", f"Who was the spouse of {name}?",
                  f"Whom did {name} marry?"]),
        ],
        distractors=_distractors(rng, world, [
            "{their} brother ran a bakery in {city}.",
            "{they} never met the mayor of {city}.",
            "A street in {city} carries {their_lower} name.",
            "{their} father was a founder of a choir in {city}.",
            "{they} liked to fish in the {river}.",
            "{they} wrote letters to {person} for many years.",
            "{they} owned one of the first {invention}s."],
            exclude=(name,), they=they, their=their, their_lower=their.lower()),
    )


def build_company(rng, world: World, index: int, name: str) -> Entity:
    founder = rng.choice(world.people)
    return Entity(
        passage_id=f"company-{index:03d}",
        intro=Fact(
            _pick(rng, ["{n} was founded by {f}.", "{f} started {n}.",
                        "{n} was established by {f}."], n=name, f=founder.name),
            [f"Who founded {name}?", f"Who started {name}?", f"Who established {name}?",
             f"Who is the founder of {name}?"]),
        facts=[
            Fact(_pick(rng, ["The firm opened in {y}.", "It began trading in {y}.",
                             "Its first workshop opened in {y}."], y=_year(rng, 1750, 1900)),
                 [f"When was {name} founded?", f"In what year did {name} open?",
                  f"How old is {name}?"]),
            Fact(_pick(rng, ["It is based in {c}.", "Its headquarters are in {c}.",
                             "The company has its main office in {c}."],
                       c=rng.choice(world.cities)),
                 [f"Where is {name} based?", f"Where are the headquarters of {name}?",
                  f"In which city is {name} located?"]),
            Fact(_pick(rng, ["It makes {p}.", "The firm produces {p}.",
                             "It is best known for its {p}."], p=rng.choice(PRODUCTS)),
                 [f"What does {name} make?", f"What does {name} produce?",
                  f"What products is {name} known for?"]),
            Fact(_pick(rng, ["It employs about {k} people.",
                             "Around {k} workers are on its payroll.",
                             "Its staff numbers some {k}."], k=_count(rng, 30, 5000, 10)),
                 [f"How many people work at {name}?", f"How many employees does {name} have?",
                  f"How large is the workforce of {name}?"]),
        ],
        distractors=_distractors(rng, world, [
            "A rival firm in {city} makes {product}.",
            "Its founder also started a rowing club in {city}.",
            "It once supplied the mayor of {city}.",
            "Its barges carry goods along the {river}.",
            "Its first manager was {person}.",
            "Its workshop still repairs the old {invention}."],
            exclude=(name, founder.name)),
    )


def build_invention(rng, world: World, index: int, name: str, inventor: Person) -> Entity:
    return Entity(
        passage_id=f"invention-{index:03d}",
        intro=Fact(
            _pick(rng, ["The {n} was invented by {i}.", "{i} designed the {n}.",
                        "The first {n} was built by {i}."], n=name, i=inventor.name),
            [f"Who invented the {name}?", f"Who designed the {name}?",
             f"Who came up with the {name}?", f"Who built the first {name}?"]),
        facts=[
            Fact(_pick(rng, ["It dates from {y}.", "The first working model appeared in {y}.",
                             "It was patented in {y}."], y=_year(rng, 1760, 1900)),
                 [f"When was the {name} invented?", f"In what year was the {name} first built?",
                  f"How old is the {name}?"]),
            Fact(_pick(rng, ["It is used to {p}.", "The device helps to {p}.",
                             "People rely on it to {p}."], p=rng.choice(PURPOSES)),
                 [f"What is the {name} used for?", f"What does the {name} do?",
                  f"What is the purpose of the {name}?"]),
            Fact(_pick(rng, ["Today it is made by {m}.", "{m} manufactures it.",
                             "It is produced by {m}."], m=rng.choice(world.companies)),
                 [f"Which company makes the {name}?", f"Who manufactures the {name}?",
                  f"Which firm produces the {name}?"]),
        ],
        distractors=_distractors(rng, world, [
            "Early models were shown at a fair in {city}.",
            "A copy stands in the museum of {city}.",
            "Some say a student in {city} invented it first.",
            "It was first tested on the {river}.",
            "{person} wrote a poem about it."],
            exclude=(name, inventor.name)),
    )


def build_world(rng: random.Random, *, num_cities=60, num_people=120, num_companies=60,
                num_inventions=40) -> list[Entity]:
    """All entities, each with its passage written. Rivers pair up the cities."""
    names = Names(rng)
    cities = [names.draw(_city_name) for _ in range(num_cities)]
    rivers = [names.draw(_river_name) for _ in range(num_cities // 2)]
    people = []
    for _ in range(num_people):
        female = rng.random() < 0.5
        first = rng.choice(FEMALE_NAMES if female else MALE_NAMES)
        surname = names.draw(_surname)
        people.append(Person(f"{first} {surname}", surname,
                             "She" if female else "He", "Her" if female else "His"))
    # Spouses have no passage of their own: were they people of the world, their passages
    # would answer "Who was X married to?" too.
    spouses = [f"{rng.choice(FEMALE_NAMES + MALE_NAMES)} {names.draw(_surname)}" for _ in people]
    companies = [names.draw(_company_name) for _ in range(num_companies)]
    # Inventions are often named after their inventor, which makes the person's own passage
    # a lexical near miss for "Who invented the Wrenn lamp?".
    inventors = [rng.choice(people) for _ in range(num_inventions)]
    inventions = [names.draw(lambda r, i=i: f"{r.choice([i.surname, r.choice(people).surname])}"
                                            f" {r.choice(DEVICES)}") for i in inventors]
    world = World(cities, rivers, people, companies, inventions)

    river_cities = rng.sample(cities, len(cities))   # each city lies on exactly one river
    entities = [build_city(rng, world, i, city, rng.choice(people))
                for i, city in enumerate(cities)]
    entities += [build_river(rng, world, i, river, river_cities[2 * i: 2 * i + 2])
                 for i, river in enumerate(rivers)]
    entities += [build_person(rng, world, i, person, spouse)
                 for i, (person, spouse) in enumerate(zip(people, spouses))]
    entities += [build_company(rng, world, i, company) for i, company in enumerate(companies)]
    entities += [build_invention(rng, world, i, invention, inventor)
                 for i, (invention, inventor) in enumerate(zip(inventions, inventors))]
    for entity in entities:
        entity.passage = write_passage(rng, entity)
    return entities


def write_passage(rng: random.Random, entity: Entity) -> str:
    body = [fact.sentence for fact in entity.facts] + entity.distractors
    rng.shuffle(body)
    return " ".join([entity.intro.sentence] + body)


def split_questions(rng: random.Random, entities: list[Entity], num_train: int, num_eval: int,
                    min_train_per_entity: int = 2):
    """Eval: one question per entity about a fact held out of train. Train: the other facts.

    Every entity gets at least `min_train_per_entity` training questions, so every eval passage
    has been seen in training (paired with questions about its other facts).
    """
    if num_eval > len(entities):
        raise ValueError(f"asked for {num_eval} eval pairs, the world has {len(entities)} passages")
    eval_entities = set(rng.sample(range(len(entities)), num_eval))
    train_rows, train_pool, eval_rows = [], [], []
    for index, entity in enumerate(entities):
        facts = entity.all_facts
        held_out = rng.randrange(len(facts)) if index in eval_entities else None
        candidates = []
        for fact_index, fact in enumerate(facts):
            if fact_index == held_out:
                eval_rows.append((rng.choice(fact.questions), entity))
            else:
                candidates.extend((question, entity) for question in fact.questions)
        rng.shuffle(candidates)
        train_rows.extend(candidates[:min_train_per_entity])
        train_pool.extend(candidates[min_train_per_entity:])
    if not len(train_rows) <= num_train <= len(train_rows) + len(train_pool):
        raise ValueError(f"num_train must be in [{len(train_rows)}, "
                         f"{len(train_rows) + len(train_pool)}] for this world, got {num_train}")
    train_rows += rng.sample(train_pool, num_train - len(train_rows))
    rng.shuffle(train_rows)
    rng.shuffle(eval_rows)
    return _rows("train", train_rows), _rows("eval", eval_rows)


def _rows(split, pairs):
    return [{"query_id": f"{split}-{i:05d}", "query": query, "passage_id": entity.passage_id,
             "passage": entity.passage} for i, (query, entity) in enumerate(pairs)]


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def train_vocabulary(output_dir: str, texts: list[str], vocab_size: int) -> str:
    sys.path.insert(0, REPO_ROOT)
    from samtone.data.tokenizer import train_sentencepiece  # noqa: E402 (script run from repo)

    # A relative prefix keeps the output path out of the model's stored trainer spec.
    cwd = os.getcwd()
    os.chdir(output_dir)
    try:
        # "identity" instead of T5's "nmt_nfkc": the text is plain ASCII, and the NFKC table
        # would add ~240 KB to the package.
        train_sentencepiece(texts, "spm", vocab_size, strict_vocab_size=True,
                            normalization_rule_name="identity")
    finally:
        os.chdir(cwd)
    os.remove(os.path.join(output_dir, "spm.vocab"))
    return os.path.join(output_dir, "spm.model")


def tfidf_baseline(train_rows: list[dict], eval_rows: list[dict]) -> dict[str, float]:
    """P@1 / MRR of TF-IDF cosine retrieval over the eval corpus (the eval passages)."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    passages = sorted({row["passage"] for row in eval_rows})
    index = {passage: i for i, passage in enumerate(passages)}
    vectorizer = TfidfVectorizer(sublinear_tf=True).fit(
        [row["passage"] for row in train_rows] + passages)
    scores = (vectorizer.transform([row["query"] for row in eval_rows])
              @ vectorizer.transform(passages).T).toarray()
    relevant = np.array([index[row["passage"]] for row in eval_rows])
    relevant_scores = scores[np.arange(len(eval_rows)), relevant]
    ranks = 1 + (scores > relevant_scores[:, None]).sum(axis=1)
    return {"num_passages": len(passages), "p@1": float(np.mean(ranks == 1)),
            "mrr": float(np.mean(1.0 / ranks)), "chance_p@1": 1.0 / len(passages)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=2000)
    parser.add_argument("--num_eval", type=int, default=300)
    parser.add_argument("--vocab_size", type=int, default=1000)
    parser.add_argument("--skip_vocab", action="store_true", help="write only the JSONL files")
    parser.add_argument("--check", action="store_true", help="print a TF-IDF baseline (sklearn)")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    entities = build_world(rng)
    train_rows, eval_rows = split_questions(rng, entities, args.num_train, args.num_eval)
    os.makedirs(args.output_dir, exist_ok=True)
    write_jsonl(os.path.join(args.output_dir, "train.jsonl"), train_rows)
    write_jsonl(os.path.join(args.output_dir, "eval.jsonl"), eval_rows)
    print(f"{len(entities)} passages, {len(train_rows)} train and {len(eval_rows)} eval pairs "
          f"-> {args.output_dir}")
    if not args.skip_vocab:
        texts = [entity.passage for entity in entities] + [
            row["query"] for row in train_rows + eval_rows]
        print("vocabulary ->", train_vocabulary(args.output_dir, texts, args.vocab_size))
    if args.check:
        print("TF-IDF baseline on eval:", tfidf_baseline(train_rows, eval_rows))


if __name__ == "__main__":
    main()
