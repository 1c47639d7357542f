"""Shared fixtures for the end-to-end tests: a tiny synthetic shapes dataset (generated once per session),
tiny-model overrides, and tools/train.py's ``main`` loaded in-process."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from detr_ot.data.shapes import ensure_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHAPES_YAML = CONFIGS / "shapes.yaml"
COCO_YAML = CONFIGS / "detr_r50_coco.yaml"

# Parameters of the session's tiny shapes dataset. The overrides below repeat them so that
# ``build_dataset`` finds the generated copy (params.json matches) and never regenerates it.
TINY_SHAPES = dict(num_train=16, num_val=8, seed=0, min_size=64, max_size=96, max_objects=3)


def tiny_overrides(root: str | Path, output_dir: str | Path, *extra: str, epochs: int = 2) -> list[str]:
    """``key=value`` overrides for a seconds-long CPU run of a tiny DETR on the tiny shapes dataset.
    Later entries in ``extra`` win over the defaults here (the config loader applies them in order)."""
    shapes = [f"data.shapes.{k}={v}" for k, v in TINY_SHAPES.items()]
    return [
        f"data.root={root}",
        *shapes,
        "data.num_workers=0",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "model.backbone=tiny",
        "model.tiny_widths=[32,64,128,256]",  # fixed here, whatever the shapes preset uses
        "model.hidden_dim=32",
        "model.nheads=4",
        "model.dim_feedforward=64",
        "model.enc_layers=1",
        "model.dec_layers=1",
        "model.num_queries=10",
        "model.dropout=0.0",
        "optim.lr=1e-3",
        "optim.lr_backbone=1e-3",
        "optim.lr_drop=[100]",
        "log.tensorboard=false",
        "device=cpu",
        "seed=0",
        f"train.epochs={epochs}",
        f"output_dir={output_dir}",
        *extra,
    ]


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny shapes dataset (16 train / 8 val images of 64..96 px), generated once per test session."""
    root = tmp_path_factory.mktemp("shapes_data") / "shapes"
    ensure_shapes_dataset(root, **TINY_SHAPES)
    return root


@pytest.fixture(scope="session")
def train_cli() -> ModuleType:
    """tools/train.py imported as a module (its ``main(argv) -> exit code`` runs in-process)."""
    spec = importlib.util.spec_from_file_location("detr_ot_train_cli", ROOT / "tools" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def read_log(output_dir: str | Path) -> list[dict]:
    """The JSON records of ``<output_dir>/log.txt``, in file order."""
    lines = (Path(output_dir) / "log.txt").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture
def tiny(shapes_root: Path, tmp_path: Path) -> Callable[..., list[str]]:
    """``tiny(*extra, out=None, epochs=2)`` -> overrides on the session dataset, output in ``tmp_path/run``
    unless ``out`` is given."""

    def make(*extra: str, out: str | Path | None = None, epochs: int = 2) -> list[str]:
        return tiny_overrides(shapes_root, out if out is not None else tmp_path / "run", *extra, epochs=epochs)

    return make


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run a module's training tests on one torch thread: on a busy 2-core machine, two intra-op threads
    thrash and make tiny steps about ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def matcher_gradient_probe(matcher: Callable, loss_scale: float = 1.0) -> tuple[torch.Tensor, float | None]:
    """A tiny linear head -> pairwise terms -> ``matcher`` -> a plan-weighted loss whose per-pair losses are
    constants, so the only path to the head's parameters is through the matching cost. Returns (plan,
    summed |gradient| of the head's weight), the gradient None when the plan does not require grad."""
    from torch import nn

    from detr_ot.matching import PaddedTargets, compute_pairwise_terms

    torch.manual_seed(0)
    head = nn.Linear(8, 4 + 5)
    feats = torch.randn(2, 10, 8)
    targets = [
        {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "labels": torch.tensor([2])},
    ]
    padded = PaddedTargets.from_list(targets, "cpu")
    l_pair = torch.rand(2, 10, 2) * loss_scale
    l_bg = torch.rand(2, 10) * loss_scale
    out = head(feats)
    plan = matcher(compute_pairwise_terms(out[..., 4:], out[..., :4].sigmoid(), padded)).plan
    if not plan.requires_grad:
        return plan, None
    ((plan[..., 1:] * l_pair).sum() + (plan[..., 0] * l_bg).sum()).backward()
    assert head.weight.grad is not None
    return plan, float(head.weight.grad.abs().sum())
