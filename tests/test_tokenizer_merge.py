"""Merging models whose vocabularies differ: the output vocabulary (tokenizer_source / tokenizer block), the
embedding and head rows aligned onto it, and chat templates; checked against mergekit 0.1.5 and a naive
row-by-row reference."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import modelfuse
from _vocab_models import save_member
from conftest import Cli, MergekitParity, error_lines
from modelfuse.errors import ModelfuseError
from modelfuse.io.chat_templates import NAMED_TEMPLATES, resolve_chat_template
from modelfuse.kernels.omp import orthogonal_matching_pursuit
from modelfuse.kernels.vocabulary import OmpFill, RowSource, align_vocabulary, default_sources

TOKEN_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}")


# --- the alignment against a naive reference ---------------------------------------------------------------

def _naive(tensors: list[torch.Tensor], index: torch.Tensor, base: int | None, given: dict[int, RowSource],
           forced: set[int], rows: int) -> list[torch.Tensor]:
    """Token by token and model by model, the rules as mergekit 0.1.5 states them."""
    size = index.shape[1]
    out = []
    for model, tensor in enumerate(tensors):
        result = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype)
        for token in range(size):
            holders = [m for m in range(len(tensors)) if index[m, token] >= 0]
            if index[model, token] >= 0 and token not in forced:
                result[token] = tensor[index[model, token]]
                continue
            rule = given.get(token)
            if rule is not None:
                result[token] = (torch.zeros(tensor.shape[1:]) if rule.kind == "zero"
                                 else tensors[rule.model][rule.row])
            elif len(holders) == 1:
                result[token] = tensors[holders[0]][index[holders[0], token]]
            elif base is not None and base in holders:
                result[token] = tensors[base][index[base, token]]
            elif holders:
                total = torch.zeros(tensor.shape[1:])
                for holder in holders:
                    total = total + tensors[holder][index[holder, token]]
                result[token] = total / len(holders)
        if rows > size:
            result[size:] = result[:size].mean(dim=0)
        out.append(result)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_alignment_matches_a_naive_reference(seed: int) -> None:
    """Random vocabularies (tokens each model lacks, absent everywhere), rules, forced tokens and padding."""
    rng = random.Random(seed)
    models, size, width = rng.randint(2, 4), rng.randint(5, 30), 3
    tensors, rows_of = [], []
    for _ in range(models):
        own = rng.randint(size // 2, size)
        tensors.append(torch.randn(own + rng.randint(0, 3), width, generator=torch.Generator().manual_seed(seed)))
        rows_of.append(own)
    index = torch.full((models, size), -1, dtype=torch.int64)
    for model in range(models):
        tokens = rng.sample(range(size), rows_of[model])
        index[model, tokens] = torch.tensor(rng.sample(range(rows_of[model]), rows_of[model]))
    base = rng.choice([None, *range(models)])
    given = {rng.randrange(size): RowSource("zero"), rng.randrange(size): RowSource("row", 0, 0)}
    forced = {token for token in given if rng.random() < 0.5}
    rows = size + rng.choice([0, 0, 3])
    sources, absent = default_sources(index, base, given)
    assert all(bool((index[:, token] < 0).all()) for token in absent)
    got = align_vocabulary(tensors, index, sources, frozenset(forced), rows)
    want = _naive(tensors, index, base, given, forced, rows)
    for mine, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_omp_fill_builds_each_lacking_row_in_the_models_own_space() -> None:
    """init: omp: a model's row of a token it lacks is the donor's OMP code (over the tokens both share) applied
    to the model's rows of those tokens; the donor is the base when it has the token; rows the model has, and
    ruled tokens, keep the default alignment."""
    generator = torch.Generator().manual_seed(0)
    size, width = 12, 6
    index = torch.tensor([list(range(12)),  # the base has every token
                          [0, 1, 2, 3, 4, 5, 6, 7, 8, -1, -1, -1],  # model 1 lacks 9, 10, 11
                          [0, 1, 2, 3, 4, 5, 6, 7, -1, -1, -1, 8]])  # model 2 lacks 8, 9, 10
    tensors = [torch.randn(12, width, generator=generator, dtype=torch.float64),
               torch.randn(9, width, generator=generator, dtype=torch.float64),
               torch.randn(9, width, generator=generator, dtype=torch.float64)]
    given = {10: RowSource("zero")}
    sources, _ = default_sources(index, 0, given)
    plain = align_vocabulary(tensors, index, sources, frozenset(), size)
    filled = align_vocabulary(tensors, index, sources, frozenset(), size, OmpFill(3, 0, frozenset(given)))
    for model, lacking in ((1, [9, 11]), (2, [8, 9])):
        shared = [t for t in range(size) if index[model, t] >= 0]
        for token in lacking:
            atoms, codes = orthogonal_matching_pursuit(tensors[0][shared], tensors[0][token][None], 3)
            want = codes[0] @ tensors[model][[int(index[model, shared[a]]) for a in atoms[0]]]
            torch.testing.assert_close(filled[model][token], want)
            assert not torch.equal(filled[model][token], plain[model][token])
        kept = [t for t in range(size) if t not in lacking]
        torch.testing.assert_close(filled[model][kept], plain[model][kept])  # own rows and the ruled token 10
    torch.testing.assert_close(filled[0], plain[0])


def test_init_omp_through_the_engine(members: dict[str, Path], tmp_path: Path) -> None:
    """tokenizer: {source: union, init: omp}: the output loads, and a token the base lacks gets, in the base's
    slot of a linear merge, the OMP row built over the base's own embeddings."""
    import transformers

    common = {"method": "linear", "base": str(members["a"]), "parameters": {"weight": 1.0},
              "models": [{"path": str(members["a"])}, {"path": str(members["b"])}], "dtype": "float32"}
    plain = modelfuse.merge(common | {"tokenizer": {"source": "union"}}, tmp_path / "plain")
    filled = modelfuse.merge(common | {"tokenizer": {"source": "union", "init": "omp", "k": 4}}, tmp_path / "omp")
    model = transformers.AutoModelForCausalLM.from_pretrained(filled)
    tokenizer = transformers.AutoTokenizer.from_pretrained(filled)
    token = tokenizer.convert_tokens_to_ids("<|im_end|>")
    got = model.get_input_embeddings().weight.detach()
    before = transformers.AutoModelForCausalLM.from_pretrained(plain).get_input_embeddings().weight.detach()
    assert not torch.allclose(got[token], before[token])  # the base's slot is built, not b's row copied
    shared = [t for t in range(token) if t != tokenizer.convert_tokens_to_ids("<|im_start|>")]
    assert torch.allclose(got[shared], before[shared])


# --- against mergekit ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """a: the base vocabulary; b: two special tokens added; c: two plain added tokens and 3 padding rows;
    d: one more BPE merge ('st', a vocabulary token, not an added one); e: one of b's and one of c's tokens (rows
    the base lacks and two models have: their mean)."""
    root = tmp_path_factory.mktemp("vocab")
    return {"a": save_member(root / "a", seed=0),
            "b": save_member(root / "b", seed=1, special=["<|im_start|>", "<|im_end|>"]),
            "c": save_member(root / "c", seed=2, added=["zebra", "yak"], extra_rows=3),
            "d": save_member(root / "d", seed=3, merges=[("s", "t")]),
            "e": save_member(root / "e", seed=4, special=["<|im_start|>"], added=["zebra"])}


def _config(members: dict[str, Path], method: str, models: str, **extra: Any) -> dict[str, Any]:
    params = {"weight": 0.6, "density": 0.5} if method in ("ties", "dare_ties") else {"weight": 0.6}
    config: dict[str, Any] = {"merge_method": method, "base_model": str(members["a"]), "dtype": "float32",
                              "models": [{"model": str(members[name]), "parameters": params} for name in models]}
    if method == "linear":
        config["models"].append({"model": str(members["a"]), "parameters": {"weight": 0.4}})
    return {**config, **extra}


def _vocab(folder: Path) -> dict[str, int]:
    """The saved tokenizer's full vocabulary (model vocabulary and added tokens), by token."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(data["model"]["vocab"])
    vocab.update({entry["content"]: entry["id"] for entry in data["added_tokens"]})
    return vocab


def _compare(parity: MergekitParity, config: dict[str, Any]) -> tuple[Path, Path]:
    """Run both tools; tensors equal after matching output ids by token (mergekit's order of the tokens a
    union adds follows a Python set of models), the same tokens and added-token settings, the same vocab_size."""
    mk, mf = parity.run(config)
    work = parity.folder / f"parity{parity.runs}"
    mk_dir, mf_dir = work / "out_mergekit", work / "out_modelfuse"
    mk_vocab, mf_vocab = _vocab(mk_dir), _vocab(mf_dir)
    assert set(mk_vocab) == set(mf_vocab)
    order = torch.tensor([mk_vocab[token] for token in sorted(mf_vocab, key=mf_vocab.__getitem__)])
    for name in TOKEN_TENSORS:
        size = len(order)
        assert mk[name].shape == mf[name].shape, name
        head = torch.cat([mk[name][order], mk[name][size:]])  # mergekit's rows in modelfuse's token order
        mk[name] = head
    parity.assert_equal(mk, mf, tol=1e-6)
    settings = [lambda d: {(e["content"], e["special"], e["normalized"], e["lstrip"], e["rstrip"]) for e in
                           json.loads((d / "tokenizer.json").read_text())["added_tokens"]}]
    assert settings[0](mk_dir) == settings[0](mf_dir)
    mk_config, mf_config = (json.loads((d / "config.json").read_text()) for d in (mk_dir, mf_dir))
    assert mk_config["vocab_size"] == mf_config["vocab_size"] == mf["model.embed_tokens.weight"].shape[0]
    return mk_dir, mf_dir


@pytest.mark.parametrize(("method", "source"), [
    ("ties", "union"), ("ties", "base"), ("ties", "b"), ("linear", "union"), ("task_arithmetic", "c"),
    ("dare_linear", "e")])
def test_tokenizer_source_matches_mergekit(mergekit_parity: MergekitParity, members: dict[str, Path],
                                           method: str, source: str) -> None:
    """union, base and a model's tokenizer over three models with added special, plain added and extra BPE
    tokens, and padding rows: the same vocabulary and the same merged tensors."""
    value = source if source in ("union", "base") else str(members[source])
    config = _config(members, method, "bcde", tokenizer_source=value)
    if method == "dare_linear":  # density 1: no entry dropped, so mergekit's random draw does not matter
        config["parameters"] = {"density": 1.0}
    _compare(mergekit_parity, config)


def test_tokenizer_block_matches_mergekit(mergekit_parity: MergekitParity, members: dict[str, Path]) -> None:
    """The tokenizer block: a new token from a model's row of another token, a forced zero row, a token from a
    named model, and padding to a multiple of 16 (40 tokens, 48 rows)."""
    tokens = {"<new>": {"source": {"kind": "model_token", "model": str(members["b"]), "token": "<|im_start|>"}},
              "the": {"source": {"kind": "zero"}, "force": True},
              "zebra": {"source": str(members["c"])},
              "<|im_end|>": {"source": {"kind": "model_token", "model": str(members["a"]), "token_id": 2}}}
    config = _config(members, "ties", "bc", tokenizer={"source": "union", "tokens": tokens, "pad_to_multiple_of": 16})
    _, mf_dir = _compare(mergekit_parity, config)
    embed = MergekitParity.load(mf_dir)["model.embed_tokens.weight"]
    assert embed.shape[0] == 48 and "<new>" in _vocab(mf_dir)


def test_output_loads_in_transformers_and_encodes_the_new_tokens(members: dict[str, Path], tmp_path: Path,
                                                                 run_cli: Cli) -> None:
    """A modelfuse recipe with a tokenizer block, through the CLI: transformers loads model and tokenizer, the
    added tokens encode to single ids inside the embedding, and `plan` names the built tokenizer."""
    import transformers

    recipe = {"method": "ties", "base": str(members["a"]), "parameters": {"density": 0.5},
              "models": [{"path": str(members["b"])}, {"path": str(members["c"])}],
              "tokenizer": {"source": "union"}, "chat_template": "chatml"}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    shown = run_cli("plan", path)
    assert shown.returncode == 0 and "built (union): 39 tokens" in shown.stdout, shown.stdout
    out = tmp_path / "out"
    assert run_cli("merge", path, out).returncode == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("<|im_start|> zebra the", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 and max(ids) < model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 39
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n")
    logits = model(torch.tensor([ids])).logits
    assert logits.shape[-1] == 39 and bool(torch.isfinite(logits).all())
    # The built vocabulary is written even with --no-copy-tokenizer (as mergekit writes it): the rows follow it.
    bare = tmp_path / "bare"
    assert run_cli("merge", path, bare, "--no-copy-tokenizer").returncode == 0
    assert (bare / "tokenizer.json").is_file()


def test_tokenizer_problems_are_one_line_each(members: dict[str, Path], tmp_path: Path, run_cli: Cli) -> None:
    """A rule without a source for a token a model lacks, and a source model that is not merged, are named."""
    recipe = {"method": "ties", "base": str(members["a"]), "parameters": {"density": 0.5},
              "models": [{"path": str(members["b"])}],
              "tokenizer": {"source": "union", "tokens": {"<|im_end|>": {}, "<x>": {"source": str(members["d"])}}}}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = run_cli("merge", path, tmp_path / "out", "--verbose")
    assert result.returncode == 1
    lines = "\n".join(error_lines(result))
    assert "tokenizer.tokens.<|im_end|>: a model lacks this token" in lines
    assert f"tokenizer.tokens.<x>: source model {str(members['d'])!r} is not one of the models" in lines
    assert not (tmp_path / "out").exists()


def test_model_without_tokenizer_is_taken_to_share_the_base_vocabulary(members: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    """As mergekit: an input without tokenizer files is read with the base's vocabulary, and a warning says so."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(members["a"], bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    plan = modelfuse.plan(modelfuse.Recipe(method="ties", base=str(members["a"]), parameters={"density": 0.5},
                                           models=[{"path": str(bare)}, {"path": str(members["b"])}],
                                           tokenizer={"source": "union"}))
    assert any(f"{bare} has no tokenizer that loads" in line for line in plan.warnings)
    assert plan.vocabulary is not None and plan.vocabulary.size == 37


# --- chat templates -----------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "hi there "}],
    [{"role": "system", "content": " be nice"}, {"role": "user", "content": " q1"},
     {"role": "assistant", "content": "a1 "}, {"role": "user", "content": "q2"}],
    [{"role": "user", "content": "summarise"}, {"role": "user_context", "content": " the text "},
     {"role": "assistant", "content": "done"}],
    [{"role": "system", "content": "s1"}, {"role": "user", "content": "x"}, {"role": "system", "content": "s2"}],
    [{"role": "assistant", "content": "first"}, {"role": "user", "content": "then"}],
]


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_named_chat_templates_render_as_mergekits(name: str) -> None:
    """Every conversation renders to the same text (or the same refusal) with ours and mergekit's template."""
    pytest.importorskip("mergekit")
    import importlib.resources

    from mergekit._data import chat_templates

    from _vocab_models import bpe_tokenizer

    theirs = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
    tokenizer = bpe_tokenizer()

    def render(template: str, messages: list[dict[str, str]], prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=prompt)
        except Exception as error:  # mistral refuses some role orders: both must refuse alike
            return f"refused: {error}"

    for messages in CONVERSATIONS:
        for prompt in (False, True):
            assert render(NAMED_TEMPLATES[name], messages, prompt) == render(theirs, messages, prompt), messages


def test_chat_template_auto_and_jinja_and_bad_name(tmp_path: Path) -> None:
    """auto takes the template most inputs have; a Jinja string is kept; anything else is refused."""
    folders = []
    for index, template in enumerate(["{{ 'one' }}", "{{ 'two' }}", "{{ 'two' }}\n", None]):
        folder = tmp_path / str(index)
        folder.mkdir()
        config = {"chat_template": template} if template else {}
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        folders.append(folder)
    assert resolve_chat_template("auto", folders) == "{{ 'two' }}"
    assert resolve_chat_template("auto", folders[3:]) is None
    assert resolve_chat_template(CHATML, folders) == CHATML
    with pytest.raises(ModelfuseError, match="neither a template name"):
        resolve_chat_template("chatml2", folders)


def test_chat_template_on_a_copied_tokenizer_matches_mergekit(mergekit_parity: MergekitParity,
                                                              members: dict[str, Path]) -> None:
    """Without a tokenizer block, the base's tokenizer is written with the recipe's chat template, as mergekit
    writes it (--copy-tokenizer)."""
    import subprocess
    import sys

    import transformers

    config = {"merge_method": "linear", "dtype": "float32", "chat_template": "llama3",
              "models": [{"model": str(members["a"]), "parameters": {"weight": 1.0}}]}
    work = mergekit_parity.folder / "template"
    work.mkdir()
    (work / "merge.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(work / "merge.yml"),
                           str(work / "mk"), "--no-cuda", "--quiet"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    modelfuse.merge(work / "merge.yml", work / "mf")
    rendered = [transformers.AutoTokenizer.from_pretrained(work / side).apply_chat_template(
        CONVERSATIONS[1], tokenize=False, add_generation_prompt=True) for side in ("mk", "mf")]
    assert rendered[0] == rendered[1] and rendered[1].startswith("<s><|start_header_id|>system")
