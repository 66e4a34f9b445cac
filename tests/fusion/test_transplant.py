"""fusion/transplant on tiny models: shared tokens keep their rows, new tokens' rows are the OMP combination
(checked against scikit-learn's OrthogonalMatchingPursuit), the output loads with the donor's tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import _fusion_tokenizers as tokenizers
from modelfuse.fusion.tokens import token_texts
from modelfuse.fusion.transplant import transplant
from modelfuse.fusion.vocab_map import exact_map, special_pairs
from modelfuse.kernels.omp import orthogonal_matching_pursuit


@pytest.mark.parametrize("batch", [1, 2, 256])
def test_omp_equals_scikit_learn(batch: int) -> None:
    """Batched or not, with a target inside the span of two atoms (it stops after two)."""
    from sklearn.linear_model import OrthogonalMatchingPursuit

    generator = torch.Generator().manual_seed(0)
    dictionary = torch.randn(40, 12, generator=generator, dtype=torch.float64)
    targets = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    targets[2] = 0.5 * dictionary[3] - 2.0 * dictionary[17]
    atoms, codes = orthogonal_matching_pursuit(dictionary, targets, 6, batch=batch)
    assert int((codes[2] != 0).sum()) == 2
    for row in range(5):
        reference = OrthogonalMatchingPursuit(n_nonzero_coefs=6, fit_intercept=False)
        reference.fit((dictionary / dictionary.norm(dim=1, keepdim=True)).T.numpy(), targets[row].numpy())
        dense = torch.zeros(40, dtype=torch.float64)
        dense[atoms[row]] = codes[row]
        # scikit-learn fits on normalised atoms: rescale its coefficients back
        want = torch.from_numpy(reference.coef_) / dictionary.norm(dim=1)
        assert torch.allclose(dense, want, atol=1e-8)


@pytest.mark.parametrize("init", ["omp", "mean"])
def test_transplant_keeps_shared_rows_and_builds_the_rest(tmp_path: Path, init: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_folder = tokenizers.save_tiny_model(tmp_path / "model", tokenizers.byte_level(), seed=1)
    donor_folder = tokenizers.save_tiny_model(tmp_path / "donor", tokenizers.metaspace(), seed=2)
    report = transplant(model_folder, donor_folder, tmp_path / "out", init=init, k=8)  # type: ignore[arg-type]
    model = AutoModelForCausalLM.from_pretrained(model_folder)
    donor = AutoModelForCausalLM.from_pretrained(donor_folder)
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    new_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(new_tokenizer) == out.get_input_embeddings().weight.shape[0] == report.tokens
    own, new = token_texts(AutoTokenizer.from_pretrained(model_folder)), token_texts(new_tokenizer)
    to_model = exact_map(new, own)
    for new_id, model_id in special_pairs(new_tokenizer, AutoTokenizer.from_pretrained(model_folder)).items():
        to_model[new_id] = model_id  # special tokens by role, as the transplant pairs them
    embeddings, built = model.get_input_embeddings().weight, out.get_input_embeddings().weight
    shared = [i for i in range(len(new.texts)) if to_model[i] >= 0 and i not in new.special]
    assert shared and all(torch.equal(built[i], embeddings[to_model[i]]) for i in shared)
    assert report.built > 0 and report.copied + report.built == report.tokens
    missing = [i for i in range(len(new.texts)) if to_model[i] < 0]
    if init == "omp":  # the OMP closed form: the donor's codes over the shared tokens, applied to the model's rows
        anchors = [i for i in range(len(new.texts)) if to_model[i] >= 0]
        donor_rows = donor.get_input_embeddings().weight.detach()
        atoms, codes = orthogonal_matching_pursuit(donor_rows[anchors], donor_rows[missing[:5]], 8)
        model_rows = embeddings.detach()[[int(to_model[i]) for i in anchors]].double()
        want = torch.einsum("nk,nkd->nd", codes, model_rows[atoms]).float()
        assert torch.allclose(built[missing[:5]], want, atol=1e-6)
    assert torch.isfinite(out(torch.tensor([new_tokenizer("the cat")["input_ids"]])).logits).all()
    assert isinstance(report.numerals_split_differently, list)




def test_transplant_through_the_cli(tmp_path: Path, run_cli: Any) -> None:
    model_folder = tokenizers.save_tiny_model(tmp_path / "model", tokenizers.byte_level(), seed=1)
    donor_folder = tokenizers.save_tiny_model(tmp_path / "donor", tokenizers.metaspace(), seed=2)
    result = run_cli("tokenizer", "transplant", model_folder, "--tokenizer", donor_folder, "-o", tmp_path / "out",
                     "--k", "4", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "rows kept" in result.stdout
    transplant(model_folder, donor_folder, tmp_path / "api", k=4, device="cpu")
    from safetensors.torch import load_file

    assert all(torch.equal(value, load_file(tmp_path / "api" / "model.safetensors")[name])
               for name, value in load_file(tmp_path / "out" / "model.safetensors").items())
    result = run_cli("tokenizer", "transplant", model_folder, "--tokenizer", donor_folder, "-o", tmp_path / "bad",
                     "--init", "zero")
    assert result.returncode != 0 and "--init 'zero'" in result.stderr
