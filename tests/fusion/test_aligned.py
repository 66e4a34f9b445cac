"""fusion/aligned and fusion/vocab_map: sources carried onto the target's tokens; maps against brute force."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import _fusion_tokenizers as tokenizers
from modelfuse.errors import ModelfuseError
from modelfuse.fusion.aligned import AlignSettings, align_sources
from modelfuse.fusion.logits import LogitsSettings, encode, source_distributions
from modelfuse.fusion.tokens import TokenTexts, token_texts
from modelfuse.fusion.vocab_map import exact_map, min_edit_map, statistics_map
from modelfuse.kernels.edit_distance import levenshtein


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("aligned")
    data = root / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"text": text}) for text in tokenizers.CORPUS[:7]) + "\n", encoding="utf-8")
    paths = {"data": data,
             "source": tokenizers.save_tiny_model(root / "source", tokenizers.byte_level(), seed=1),
             "target": tokenizers.save_tiny_model(root / "target", tokenizers.metaspace(), seed=2)}
    source_distributions(paths["source"], paths["target"], root / "logits", LogitsSettings(str(data), top_k=5,
                                                                                          shard_sequences=3))
    paths["logits"] = root / "logits"
    return paths


@pytest.mark.parametrize("align", ["dtw", "offsets"])
def test_sources_are_carried_onto_the_target_tokens(setup: dict[str, Path], tmp_path: Path, align: str) -> None:
    from transformers import AutoTokenizer

    reports = align_sources([setup["logits"]], setup["target"], tmp_path / "aligned",
                            AlignSettings(align=align, vocab_map="min_edit"))  # type: ignore[arg-type]
    assert 0.3 < reports[0].aligned_rate <= 1.0 and 0.5 < reports[0].coverage <= 1.0
    source_tokenizer = AutoTokenizer.from_pretrained(setup["source"])
    target_tokenizer = AutoTokenizer.from_pretrained(setup["target"])
    source, target = token_texts(source_tokenizer), token_texts(target_tokenizer)
    exact = exact_map(source, target)
    manifest = json.loads((tmp_path / "aligned" / "manifest.json").read_text())
    checked = 0
    for name in manifest["shards"]:
        shard, logits = load_file(tmp_path / "aligned" / name), load_file(setup["logits"] / name)
        starts = shard["starts"].tolist()
        for row, index in enumerate(shard["text_index"].tolist()):
            text = tokenizers.CORPUS[index]
            ids = shard["input_ids"][starts[row]:starts[row + 1]].tolist()
            assert ids == encode(target_tokenizer, _text(text), 512).ids
            carried = shard["source0.mapped"][starts[row]:starts[row + 1]].tolist()
            rows = shard["source0.ids"][starts[row]:starts[row + 1]].tolist()
            for position, (flag, entries) in enumerate(zip(carried, rows, strict=True)):
                present = [token for token in entries if token >= 0]
                assert len(present) == len(set(present))  # an id is kept once
                if position == len(ids) - 1:
                    assert present == [] or flag  # the last position predicts nothing unless carried
                elif not flag:
                    assert present == [ids[position + 1]]  # one-hot on the next target token
            # a word both tokenizers spell as one piece: the source's top entry, mapped exactly, leads there
            source_first, source_last = logits["starts"][row], logits["starts"][row + 1]
            source_ids = logits["input_ids"][source_first:source_last].tolist()
            for position, token in enumerate(ids[:-1]):
                same = [j for j, other in enumerate(source_ids) if source.texts[other] == target.texts[token]
                        and target.texts[token].strip() and j < len(source_ids) - 1]
                if carried[position] and len(same) == 1 and source_ids.count(source_ids[same[0]]) == 1:
                    top = int(logits["topk_ids"][source_first + same[0], 0])
                    if exact[top] >= 0:
                        assert rows[position][0] == exact[top]
                        checked += 1
    assert checked > 0


def _text(text: str) -> object:
    from modelfuse.fusion.data import FusionText

    return FusionText(text, ((0, len(text)),))


def test_min_edit_map_equals_brute_force() -> None:
    source, target = token_texts(tokenizers.byte_level()), token_texts(tokenizers.wordpiece())
    mapped = min_edit_map(source, target)
    pool = [(token_id, text) for token_id, text in enumerate(target.texts) if text and token_id not in target.special]
    for source_id, text in enumerate(source.texts):
        if not text or source_id in source.special:
            assert mapped[source_id] == -1
            continue
        exact = [token_id for token_id, other in pool if other == text]
        want = exact[0] if exact else min(pool, key=lambda item: (levenshtein(text, item[1]), item[0]))[0]
        assert mapped[source_id] == want, text


def test_statistics_map_is_fusechats_formula() -> None:
    source = TokenTexts([b" the", b"cat", b"x"], "plain", frozenset())
    target = TokenTexts([b"the", b" th", b"cats", b"dog"], "plain", frozenset())
    counts = {(0, 0): 1, (1, 0): 9, (2, 1): 2, (3, 1): 50}
    mapped = statistics_map(source, target, counts)

    def weighted(source_id: int, target_id: int, count: int) -> float:
        a, b = source.stripped(source_id), target.stripped(target_id)
        distance = levenshtein(a, b) * (0.1 if a in b or b in a else 1.0)
        return distance / (1 + math.exp(-count))

    # " the" -> "the" (stripped distance 0) over " th" despite fewer pairings; "cat" -> "cats" (contained)
    assert weighted(0, 0, 1) < weighted(0, 1, 9) and mapped[0] == 0
    assert weighted(1, 2, 2) < weighted(1, 3, 50) and mapped[1] == 2
    assert mapped[2] == -1  # never aligned
    assert np.array_equal(statistics_map(source, target, {}), [-1, -1, -1])


def test_logits_of_other_data_are_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "something else"}) + "\n", encoding="utf-8")
    source_distributions(setup["source"], setup["target"], tmp_path / "other", LogitsSettings(str(other)))
    with pytest.raises(ModelfuseError, match="made from other data"):
        align_sources([setup["logits"], tmp_path / "other"], setup["target"], tmp_path / "aligned")
    with pytest.raises(ModelfuseError, match="not a finished `modelfuse fuse logits` output"):
        align_sources([setup["data"].parent], setup["target"], tmp_path / "aligned2")


def test_a_source_sharing_nothing_with_the_target_is_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    """A source whose tokenizer knows none of the data's pieces (a WordPiece of digits: every word is [UNK]):
    nothing of it can reach the target, so the alignment stops with one line and writes nothing."""
    digits = tokenizers.wordpiece(60, corpus=["0 1 2 3 4 5 6 7 8 9 10 11 12"] * 20)
    digits.add_special_tokens({"bos_token": "[BOS]", "eos_token": "[EOS]"})
    source = tokenizers.save_tiny_model(tmp_path / "digits", digits, seed=4)
    words = tmp_path / "words.jsonl"
    words.write_text("".join(json.dumps({"text": text}) + "\n" for text in ("the cat sat on the mat", "a dog")),
                     encoding="utf-8")
    source_distributions(source, setup["target"], tmp_path / "logits", LogitsSettings(str(words)))
    with pytest.raises(ModelfuseError, match="aligned rate 0"):
        align_sources([tmp_path / "logits"], setup["target"], tmp_path / "aligned", AlignSettings(vocab_map="exact"))
    assert not (tmp_path / "aligned").exists()


def test_models_without_a_tokenizer_or_not_causal_are_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    import transformers as tf

    bare = tmp_path / "bare"
    shutil.copytree(setup["source"], bare)
    for file in bare.glob("tokenizer*"):
        file.unlink()
    with pytest.raises(ModelfuseError, match="cannot load"):
        source_distributions(bare, setup["target"], tmp_path / "out1", LogitsSettings(str(setup["data"])))
    encoder = tmp_path / "encoder"
    tf.T5EncoderModel(tf.T5Config(vocab_size=400, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                  num_heads=2)).save_pretrained(encoder)  # an encoder: no causal LM
    tokenizers.byte_level().save_pretrained(encoder)
    with pytest.raises(ModelfuseError, match="cannot load a causal LM"):
        source_distributions(encoder, setup["target"], tmp_path / "out2", LogitsSettings(str(setup["data"])))


def test_exact_map_prefers_a_real_piece_to_a_byte_fallback_token() -> None:
    """SentencePiece vocabularies hold "1" twice: the byte token <0x31> (a low id) and the piece "1"; the
    tokenizer writes the piece, so the map takes it."""
    source = TokenTexts([b"1", b"a"], "byte_level", frozenset())
    target = TokenTexts([b"1", b"a", b"1"], "metaspace", frozenset(), byte_tokens=frozenset({0}))
    assert exact_map(source, target).tolist() == [2, 1]
    assert exact_map(source, TokenTexts([b"1", b"b"], "metaspace", frozenset(), frozenset({0}))).tolist() == [0, -1]
