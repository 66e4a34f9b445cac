"""A statistics folder written by ``modelfuse calibrate``: ``calibration.json`` (settings, the data's digest, an
index of statistic keys ``<tensor>.<statistic>`` to files) and safetensors files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from modelfuse.errors import CheckpointError
from modelfuse.io.writer import StagingFolder, write_json

CONFIG = "calibration.json"
FORMAT = "modelfuse-calibration"
ADAM = "exp_avg_sq"
ADAM_ROWS = "exp_avg_sq_row"
ADAM_COLUMNS = "exp_avg_sq_col"
ADAM_STATISTICS = (ADAM, ADAM_ROWS, ADAM_COLUMNS)
"""Adam's second moments as statistics: whole (``exp_avg_sq``), or a 2-D tensor's rank-1 compression
``v ~ row col^T`` (``row = v.sum(1)``, ``col = v.sum(0) / v.sum()``), written by ``modelfuse finetune``."""
ADAM_FILE = "adam-moments.safetensors"


def statistic_bytes(kind: str, shape: tuple[int, ...]) -> int:
    """Bytes of one float32 statistic of a tensor of ``shape``: a Gram ``[in, in]`` (per expert for a fused
    ``[experts, out, in]`` tensor), an ``act_rms`` ``[in]``, a Fisher (and any other kind) shaped like the tensor."""
    numel = 1
    for size in shape:
        numel *= size
    inputs = shape[-1] if len(shape) >= 2 else 0
    experts = shape[0] if len(shape) == 3 else 1
    rows = shape[0] if shape else 1
    per_kind = {"gram": experts * inputs * inputs, "act_rms": experts * inputs, ADAM_ROWS: rows,
                ADAM_COLUMNS: inputs}
    return 4 * per_kind.get(kind, numel)


class CalibrationStats:
    """A statistics folder written by ``calibrate``, read lazily.

    Raises:
        CheckpointError: If ``folder`` is not a complete statistics folder.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        config_file = folder / CONFIG
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{folder}: not a calibration folder (no readable {CONFIG}); make one with "
                                  "`modelfuse calibrate MODEL --data ... -o FOLDER`", path=str(folder)) from None
        settings = config.get("settings") if isinstance(config, dict) else None
        if (not isinstance(config, dict) or config.get("format") != FORMAT or config.get("version") != 1
                or not isinstance(config.get("index"), dict) or not isinstance(settings, dict)
                or not isinstance(settings.get("statistics"), list)):
            raise CheckpointError(f"{config_file}: not a version-1 {FORMAT} file (calibrate again)",
                                  path=str(config_file))
        self.index: dict[str, str] = config["index"]
        for file in sorted(set(self.index.values())):
            if not isinstance(file, str) or Path(file).name != file or not (folder / file).is_file():
                raise CheckpointError(f"{config_file}: its index names {file!r}, which is not a file of the folder "
                                      "(calibrate again)", path=str(config_file))
        self.statistics = tuple(settings["statistics"])

    @property
    def files(self) -> list[Path]:
        """The folder's files (its settings and statistics)."""
        return [self.folder / CONFIG, *(self.folder / name for name in sorted(set(self.index.values())))]

    def read(self, tensor: str, statistic: str) -> torch.Tensor | None:
        """The statistic of one tensor (``None`` when the folder has none for it)."""
        key = f"{tensor}.{statistic}"
        file = self.index.get(key)
        if file is None:
            return None
        try:
            with safe_open(str(self.folder / file), framework="pt") as stored:
                return stored.get_tensor(key)
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"{self.folder / file}: cannot read {key!r} ({error})",
                                  path=str(self.folder / file)) from None



def rank1_moments(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-1 compression of a non-negative 2-D second moment: ``row = v.sum(1)``, ``col = v.sum(0) / v.sum()``
    (their outer product keeps every row and column sum of ``v``; zeros where ``v`` sums to 0)."""
    total = moment.sum()
    columns = moment.sum(0) / total if float(total) > 0 else torch.zeros(moment.shape[1], dtype=moment.dtype)
    return moment.sum(1), columns


def save_adam_moments(out: Path, moments: dict[str, torch.Tensor], *, model: str, rank1: bool,
                      steps: int) -> Path:
    """Write Adam's second moments (per checkpoint tensor name) as a statistics folder that merge recipes read
    with ``calibration: OUT``; 2-D tensors rank-1 compressed when ``rank1``."""
    stats: dict[str, torch.Tensor] = {}
    for name, moment in moments.items():
        value = moment.detach().to(torch.float32).cpu()
        if rank1 and value.dim() == 2:
            rows, columns = rank1_moments(value)
            stats[f"{name}.{ADAM_ROWS}"], stats[f"{name}.{ADAM_COLUMNS}"] = rows, columns
        else:
            stats[f"{name}.{ADAM}"] = value
    with StagingFolder(out, overwrite=True) as staging:
        save_file({key: value.contiguous() for key, value in stats.items()}, staging.path / ADAM_FILE,
                  metadata={"format": "pt"})
        write_json(staging.path / CONFIG, {
            "format": FORMAT, "version": 1, "model": model, "source": "adam",
            "settings": {"statistics": list(ADAM_STATISTICS), "rank1": rank1, "steps": steps},
            "index": {key: ADAM_FILE for key in sorted(stats)}})
        staging.commit()
    return out
