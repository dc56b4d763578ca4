"""Tokenizer: T5's pad/EOS conventions, truncation, errors, and agreement with HF's T5Tokenizer."""
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from samtone.data.tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_sentencepiece

CORPUS = [
    "Which river flows through Varnholt?",
    "The Ostra is a river that rises in the Kell Hills.",
    "Quellmark Industries was founded by Oda Wrenn in 1871.",
    "It makes steam pumps and ship engines for the northern ports.",
    "Tomas Brek worked as an engineer and studied chemistry in Kellburg.",
    "Zürich, café and naïve keep their accents; ½ is normalised by NFKC.",
] * 4

TEXTS = [
    "Who founded Quellmark Industries?",
    "Which river flows through Varnholt and Kellburg on its way to the sea?",
    "",
    "  extra   spaces  ",
    "unseen letters: qqqq xyzzy ∑",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_sentencepiece(CORPUS, tmp_path_factory.mktemp("spm") / "tiny", vocab_size=96)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return Tokenizer(model_path)


def _pieces(model_path, text):
    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    return processor.EncodeAsIds(text)


def test_ids_follow_t5_conventions(tokenizer):
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)
    assert (tokenizer.vocab_size
            == spm.SentencePieceProcessor(model_file=tokenizer.path).GetPieceSize())


@pytest.mark.parametrize("max_length", [1, 2, 5, 12, 40])
def test_encode_truncates_then_appends_eos_then_pads(tokenizer, model_path, max_length):
    token_ids = tokenizer.encode(TEXTS, max_length)
    assert token_ids.dtype == np.int32 and token_ids.shape == (len(TEXTS), max_length)
    for row, text in zip(token_ids, TEXTS):
        pieces = _pieces(model_path, text)[: max_length - 1]
        expected = pieces + [EOS_ID] + [PAD_ID] * (max_length - 1 - len(pieces))
        np.testing.assert_array_equal(row, expected)


def test_eos_survives_truncation(tokenizer):
    long_text = " ".join(CORPUS)
    (row,) = tokenizer.encode([long_text], 8)
    assert row[-1] == EOS_ID and PAD_ID not in row


def test_empty_text_is_just_eos_and_empty_batch_has_no_rows(tokenizer):
    np.testing.assert_array_equal(tokenizer.encode([""], 4), [[EOS_ID, PAD_ID, PAD_ID, PAD_ID]])
    assert tokenizer.encode([], 6).shape == (0, 6)


def test_round_trip(tokenizer):
    texts = ["Which river flows through Varnholt?", "It makes steam pumps."]
    assert tokenizer.decode(tokenizer.encode(texts, 32)) == texts
    assert tokenizer.decode(tokenizer.encode(texts, 32)[0]) == texts[0]


def test_decode_stops_at_first_eos_and_drops_padding(tokenizer):
    (row,) = tokenizer.encode(["Which river"], 10)
    garbage_after_eos = np.where(row == PAD_ID, 5, row)  # ids after EOS must be ignored
    assert tokenizer.decode(garbage_after_eos) == "Which river"


def test_unknown_characters_map_to_unk(tokenizer):
    (row,) = tokenizer.encode(["∑"], 4)
    assert UNK_ID in row


def test_batch_encoding_matches_one_at_a_time(model_path):
    texts = CORPUS + TEXTS
    batched = Tokenizer(model_path, num_threads=2).encode(texts, 16)
    single = np.concatenate([Tokenizer(model_path, num_threads=1).encode([t], 16) for t in texts])
    np.testing.assert_array_equal(batched, single)


@pytest.mark.parametrize("max_length", [1, 6, 48])
def test_matches_hugging_face_t5_tokenizer(model_path, tmp_path, max_length):
    transformers = pytest.importorskip("transformers")
    shutil.copy(model_path, tmp_path / "spiece.model")
    reference = transformers.T5Tokenizer.from_pretrained(str(tmp_path), extra_ids=0)
    expected = reference(TEXTS, max_length=max_length, truncation=True, padding="max_length")
    np.testing.assert_array_equal(Tokenizer(model_path).encode(TEXTS, max_length),
                                  expected["input_ids"])


def test_encode_rejects_a_bare_string_and_zero_length(tokenizer):
    with pytest.raises(TypeError, match="sequence of texts"):
        tokenizer.encode("a single text", 8)
    with pytest.raises(ValueError, match="max_length"):
        tokenizer.encode(["text"], 0)


def test_missing_model_names_the_file(tmp_path):
    path = tmp_path / "nowhere" / "spiece.model"
    with pytest.raises(FileNotFoundError, match="nowhere/spiece.model"):
        Tokenizer(path)


def test_non_sentencepiece_file_names_the_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("this is not a protobuf\n")
    with pytest.raises(ValueError, match=r"vocab\.txt.*not a SentencePiece model"):
        Tokenizer(path)


def test_model_with_other_ids_is_rejected(tmp_path):
    # sentencepiece's own defaults: unk=0, bos=1, eos=2, no pad.
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(CORPUS),
                                   model_prefix=str(tmp_path / "default"), vocab_size=96,
                                   hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match=r"default\.model.*pad_id=-1.*pad_id=0, eos_id=1"):
        Tokenizer(tmp_path / "default.model")


def test_train_sentencepiece_from_file_uses_t5_ids(tmp_path):
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(CORPUS) + "\n")
    path = train_sentencepiece(corpus_file, tmp_path / "from_file", vocab_size=80)
    assert path == str(tmp_path / "from_file.model")
    processor = spm.SentencePieceProcessor(model_file=path)
    assert (processor.pad_id(), processor.eos_id(), processor.unk_id(),
            processor.bos_id()) == (0, 1, 2, -1)
    assert processor.GetPieceSize() == 80


def test_train_sentencepiece_is_deterministic(tmp_path):
    paths = [train_sentencepiece(CORPUS, tmp_path / name, vocab_size=80) for name in ("a", "b")]
    first, second = (spm.SentencePieceProcessor(model_file=p) for p in paths)
    assert [first.IdToPiece(i) for i in range(80)] == [second.IdToPiece(i) for i in range(80)]


def test_train_sentencepiece_vocab_size_limits(tmp_path):
    # Soft by default: a corpus too small for the request yields a smaller vocabulary.
    small = Tokenizer(train_sentencepiece(CORPUS, tmp_path / "soft", vocab_size=5000))
    assert small.vocab_size < 5000
    with pytest.raises(RuntimeError, match="Vocabulary size too high"):
        train_sentencepiece(CORPUS, tmp_path / "strict", vocab_size=5000, strict_vocab_size=True)


def test_train_sentencepiece_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_sentencepiece(tmp_path / "missing.txt", tmp_path / "m", vocab_size=50)
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_sentencepiece(["", ""], tmp_path / "m", vocab_size=50)
