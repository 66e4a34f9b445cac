"""fusion/logits: a source's top-k distributions and per-text cross-entropy against a direct computation,
resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _fusion_tokenizers as tokenizers
from modelfuse.errors import ModelfuseError
from modelfuse.fusion.data import read_fusion_texts
from modelfuse.fusion.logits import LogitsSettings, encode, source_distributions


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fusion-models")
    return {"source": tokenizers.save_tiny_model(root / "source", tokenizers.byte_level(), seed=1),
            "target": tokenizers.save_tiny_model(root / "target", tokenizers.metaspace(), seed=2)}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fusion-data") / "tasks.jsonl"
    rows = [{"prompt": f"what is {a} + {b}?", "answer": str(a + b), "split": "train"} for a in range(3)
            for b in range(4)]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def test_topk_and_cross_entropy_equal_a_direct_computation(models: dict[str, Path], data: Path,
                                                           tmp_path: Path) -> None:
    """Every text's top-k (ids and log-probabilities) and its cross-entropy on the answer's tokens, as one forward
    pass per text computes them; shards of 5 texts, batches of 3 (padding must not change anything)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = LogitsSettings(str(data), top_k=4, batch_size=3, shard_sequences=5)
    report = source_distributions(models["source"], models["target"], tmp_path / "logits", settings)
    assert (report.texts, report.shards) == (12, 3)
    manifest = json.loads((tmp_path / "logits" / "manifest.json").read_text())
    assert manifest["texts"] == 12 and len(manifest["shards"]) == 3 and manifest["bytes_per_token"] > 0
    assert manifest["texts_without_scored_tokens"] == 0
    short = source_distributions(models["source"], models["target"], tmp_path / "short",
                                 LogitsSettings(str(data), top_k=2, max_tokens=3))
    assert short.unscored == 12  # three tokens hold no answer
    model = AutoModelForCausalLM.from_pretrained(models["source"])
    tokenizer = AutoTokenizer.from_pretrained(models["source"])
    texts = read_fusion_texts(str(data), AutoTokenizer.from_pretrained(models["target"]))
    seen = 0
    for name in manifest["shards"]:
        shard = load_file(tmp_path / "logits" / name)
        for row, index in enumerate(shard["text_index"].tolist()):
            first, last = shard["starts"][row], shard["starts"][row + 1]
            encoded = encode(tokenizer, texts[index], 512)
            assert shard["input_ids"][first:last].tolist() == encoded.ids
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([encoded.ids])).logits[0].float(), -1)
            values, ids = logprobs.topk(4, -1)
            assert torch.equal(shard["topk_ids"][first:last].long(), ids)
            assert torch.allclose(shard["topk_logprobs"][first:last].float(), values, atol=2e-3)
            labels = torch.tensor(encoded.ids[1:])
            scored = torch.tensor(encoded.label_scored[1:])
            want = -logprobs[:-1].gather(-1, labels[:, None])[:, 0][scored].mean()
            assert abs(float(shard["ce"][row]) - float(want)) < 1e-4
            answer = str(texts[index].text[texts[index].scored[0][0]:])
            scored_text = "".join(tokenizer.decode([token]) for token, flag in zip(encoded.ids, encoded.label_scored,
                                                                                   strict=True) if flag)
            assert scored_text.startswith(answer.strip())  # the answer's tokens (and EOS) are the scored ones
            seen += 1
    assert seen == 12


def test_an_interrupted_run_resumes_to_the_same_output(models: dict[str, Path], data: Path, tmp_path: Path) -> None:
    settings = LogitsSettings(str(data), top_k=3, batch_size=4, shard_sequences=4)
    source_distributions(models["source"], models["target"], tmp_path / "whole", settings)

    def stop(done: int, total: int) -> None:
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        source_distributions(models["source"], models["target"], tmp_path / "resumed", settings, on_shard=stop)
    assert not (tmp_path / "resumed").exists()
    with pytest.raises(ModelfuseError, match="another model, data or settings"):
        source_distributions(models["source"], models["target"], tmp_path / "resumed",
                             LogitsSettings(str(data), top_k=5, shard_sequences=4), resume=True)
    calls = []
    source_distributions(models["source"], models["target"], tmp_path / "resumed", settings, resume=True,
                         on_shard=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (2, 2)  # only the two shards the first run did not finish
    for name in json.loads((tmp_path / "whole" / "manifest.json").read_text())["shards"]:
        whole, resumed = load_file(tmp_path / "whole" / name), load_file(tmp_path / "resumed" / name)
        assert all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_output_inside_an_input_is_refused(models: dict[str, Path], data: Path) -> None:
    with pytest.raises(ModelfuseError, match="must not be, contain or lie inside an input"):
        source_distributions(models["source"], models["target"], models["source"] / "logits",
                             LogitsSettings(str(data)))


@pytest.mark.integration
def test_two_processes_write_what_one_writes(models: dict[str, Path], data: Path, tmp_path: Path) -> None:
    """`fuse logits` under torchrun with two ranks (gloo): each rank computes every other shard, rank 0 writes;
    the shards equal one process's."""
    import os
    import subprocess
    import sys

    binaries = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = ["fuse", "logits", str(models["source"]), "--target", str(models["target"]), "--data", str(data),
               "--top-k", "3", "--device", "cpu", "--dtype", "float32", "--batch-size", "2", "--shard-texts", "5"]
    for world in (1, 2):
        launcher = [] if world == 1 else [str(binaries / "torchrun"), "--standalone", f"--nproc-per-node={world}",
                                          "--no-python"]
        done = subprocess.run([*launcher, str(binaries / "modelfuse"), *command, "-o", str(tmp_path / f"w{world}")],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr
    one = json.loads((tmp_path / "w1" / "manifest.json").read_text())
    two = json.loads((tmp_path / "w2" / "manifest.json").read_text())
    assert one["shards"] == two["shards"] and one["tokens"] == two["tokens"]
    for name in one["shards"]:
        a, b = load_file(tmp_path / "w1" / name), load_file(tmp_path / "w2" / name)
        assert all(torch.equal(a[key], b[key]) for key in a)
