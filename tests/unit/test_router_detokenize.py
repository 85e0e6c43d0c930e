"""Incremental detokenization and stop-sequence matching on growing text."""

from __future__ import annotations

import pytest
from fake_shard import make_tokenizer_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from text_generation_router.detokenize import REPLACEMENT_CHAR, IncrementalDetokenizer
from text_generation_router.stop_sequences import find_stop_sequence, holdback
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tokenizer_dir(tmp_path_factory.mktemp("tokenizer")))


def decoder(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def stream(tok, prompt: str, text: str) -> tuple[list[str], str, list[int]]:
    """Feed the tokens of ``text`` one at a time after ``prompt``; (deltas, flushed, ids)."""
    ids = tok(text).input_ids
    detok = IncrementalDetokenizer(decoder(tok), tok(prompt).input_ids if prompt else [])
    deltas = [detok.step(i) for i in ids]
    return deltas, detok.flush(), ids


def test_multibyte_characters_split_across_tokens_never_arrive_broken(tok):
    text = "東京 🙂 café"
    deltas, rest, ids = stream(tok, "Hello", text)
    assert any(REPLACEMENT_CHAR in tok.decode([i]) for i in ids)  # the tokenizer does split them
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "".join(deltas) + rest == text
    assert "".join(deltas) == text  # nothing was left for the flush: the text ended on a whole character
    # 東 is three tokens' worth of bytes: it appears once, whole, in one delta
    assert sum("東" in d for d in deltas) == 1


def test_text_ending_inside_a_character_is_flushed_as_the_full_decode(tok):
    ids = tok("🙂").input_ids
    assert len(ids) > 1
    detok = IncrementalDetokenizer(decoder(tok), tok("Hi").input_ids)
    emitted = [detok.step(i) for i in ids[:-1]]
    assert emitted == [""] * (len(ids) - 1)  # held back: incomplete character
    assert detok.flush() == tok.decode(ids[:-1])  # on stop, what the tokenizer itself gives
    assert detok.text == tok.decode(ids[:-1])


def test_special_tokens_add_no_text(tok):
    ids = tok("Hello").input_ids + [tok.eos_token_id]
    detok = IncrementalDetokenizer(decoder(tok), [])
    assert "".join(detok.step(i) for i in ids) + detok.flush() == "Hello"


def test_prompt_context_keeps_the_leading_space_of_sentencepiece_style_tokenizers():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    sp.train_from_iterator(["The capital of France is Paris."] * 4, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    prompt, generated = sp.encode("The capital is").ids, sp.encode("Paris").ids
    assert sp.decode(generated) == "Paris"  # decoded alone, the word's space is stripped
    detok = IncrementalDetokenizer(sp.decode, prompt)
    text = "".join(detok.step(i) for i in generated) + detok.flush()
    assert text == " Paris" == sp.decode(prompt + generated)[len(sp.decode(prompt)) :]


@settings(max_examples=60, deadline=None)
@given(
    prompt=st.text(alphabet="ab c.東京🙂é", min_size=1, max_size=8),
    text=st.text(alphabet="The end. 東京🙂éü\n", min_size=1, max_size=30),
)
def test_deltas_concatenate_to_the_full_decode_and_never_hold_a_broken_character(tok, prompt, text):
    deltas, rest, ids = stream(tok, prompt, text)
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "".join(deltas) + rest == tok.decode(ids, skip_special_tokens=True)


# ---- stop sequences -------------------------------------------------------------------------------


def test_stop_sequence_found_only_where_the_new_text_completes_it():
    assert find_stop_sequence("abc STOP", 4, ["STOP"], True).keep == 8
    assert find_stop_sequence("abc STOP", 4, ["STOP"], False).keep == 4
    # completed by the new text although it started in the old text
    match = find_stop_sequence("abc STOP", 6, ["STOP"], True)
    assert (match.start, match.end) == (4, 8)
    # entirely inside the old text: already checked, not matched again
    assert find_stop_sequence("STOP and more", 10, ["STOP"], True) is None


def test_the_stop_sequence_completed_first_wins():
    match = find_stop_sequence("xx hello world", 0, ["world", "hello w", "llo"], True)
    assert match.sequence == "llo" and match.keep == len("xx hello")
    match = find_stop_sequence("ab", 0, ["ab", "b"], False)
    assert match.sequence == "ab" and match.keep == 0  # same end: the longer one (earlier start)


def test_holdback_is_one_less_than_the_longest_stop_sequence():
    assert holdback(["a", "abcd", "xy"]) == 3
    assert holdback([]) == 0
