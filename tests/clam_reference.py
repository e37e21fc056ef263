"""Reference numbers of CLAM's own models, and the recipe that makes them.

Run against a CLAM checkout (github.com/mahmoodlab/CLAM) to write ``tests/clam_reference.json``::

    python tests/clam_reference.py --clam-dir /path/to/CLAM

The script imports CLAM's ``models/model_clam.py`` from that folder (CLAM is GPL-3.0 and not
part of fastmil: nothing of it is copied here), builds CLAM_SB / CLAM_MB in the configurations
of :data:`CASES`, fills their ``state_dict`` with :func:`seeded_weights`, runs them on
:func:`seeded_bag` and stores what they return. ``tests/test_clam_dropin.py`` rebuilds the same
weights and inputs from this module for fastmil's twins (:mod:`fastmil.integrations.clam`) and
checks them against the stored numbers; CLAM itself is then not needed.

What is stored, per case: the eval-mode outputs of ``forward(h, label, instance_eval=True,
return_features=True)``; for cases with dropout, the training-mode outputs after
``torch.manual_seed`` (the features left out; the torch backend on CPU draws CLAM's dropout
masks); and, per
:data:`TRAINING` run, the losses of a few steps of CLAM's training loop (one bag per step,
``0.7 · bag cross-entropy + 0.3 · instance loss``, Adam).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

EMBED_DIM = 32  # instance feature size of the test bags (CLAM's own layers keep their sizes)
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clam_reference.json")

# The configurations run: (model, gate, size_arg, n_classes, subtyping, dropout, k_sample) and
# the bag (N instances, its label). dropout 0.25 also puts Attn_Net's score layer at module.3.
CASES = [
    dict(name="sb-gated-small-n2", model="SB", gate=True, size_arg="small", n_classes=2,
         subtyping=False, dropout=0.25, k_sample=8, N=24, label=1),
    dict(name="sb-plain-big-n3-subtyping", model="SB", gate=False, size_arg="big", n_classes=3,
         subtyping=True, dropout=0.25, k_sample=5, N=20, label=0),
    dict(name="sb-plain-small-n2-nodropout", model="SB", gate=False, size_arg="small",
         n_classes=2, subtyping=False, dropout=0.0, k_sample=8, N=32, label=0),
    dict(name="mb-gated-small-n3-subtyping", model="MB", gate=True, size_arg="small",
         n_classes=3, subtyping=True, dropout=0.25, k_sample=8, N=28, label=2),
    dict(name="mb-plain-big-n2", model="MB", gate=False, size_arg="big", n_classes=2,
         subtyping=False, dropout=0.25, k_sample=6, N=36, label=1),
    dict(name="mb-gated-big-n2-subtyping-nodropout", model="MB", gate=True, size_arg="big",
         n_classes=2, subtyping=True, dropout=0.0, k_sample=8, N=40, label=0),
]

# Short training runs: BAGS bags of EMBED_DIM features, EPOCHS passes over them, one bag per
# Adam step (CLAM's defaults: lr 1e-4, weight decay 1e-5; bag weight 0.7).
TRAINING = [
    dict(name="sb-gated-small-n2", model="SB", gate=True, size_arg="small", n_classes=2,
         subtyping=False, dropout=0.0, k_sample=8),
    dict(name="mb-plain-small-n3-subtyping", model="MB", gate=False, size_arg="small",
         n_classes=3, subtyping=True, dropout=0.0, k_sample=8),
    dict(name="sb-gated-big-n3-subtyping-dropout", model="SB", gate=True, size_arg="big",
         n_classes=3, subtyping=True, dropout=0.25, k_sample=8),
]
BAGS, EPOCHS, LR, WEIGHT_DECAY, BAG_WEIGHT = 3, 2, 1e-4, 1e-5, 0.7

MODEL_ARGS = ("gate", "size_arg", "dropout", "k_sample", "n_classes", "subtyping")


def model_kwargs(case):
    """The constructor arguments of a case (the same for CLAM's class and fastmil's twin)."""
    return {**{k: case[k] for k in MODEL_ARGS}, "embed_dim": EMBED_DIM}


def seeds(index):
    """The seeds of case ``index``: weights, inputs, training-mode dropout."""
    return 1000 + index, 2000 + index, 3000 + index


def seeded_weights(shapes, seed):
    """A state_dict of the given ``{key: shape}`` (CLAM's keys), filled deterministically.

    The keys are filled in sorted order from one ``torch.Generator`` seeded with ``seed``: a
    weight (2-D) ``N(0, 4 / fan_in)``, a bias ``N(0, 0.01)``; float32.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        t = torch.randn(shape, generator=gen, dtype=torch.float32)
        out[key] = t * (2 * shape[1] ** -0.5) if len(shape) == 2 else t * 0.1
    return out


def seeded_bag(N, seed):
    """One bag ``h [N, EMBED_DIM]`` (float32) from a generator seeded with ``seed``."""
    return torch.randn(N, EMBED_DIM, generator=torch.Generator().manual_seed(seed))


def training_bags(index):
    """The (h, label) bags of TRAINING run ``index``: N in [16, 32), label in [0, n_classes)."""
    gen = torch.Generator().manual_seed(4000 + index)
    n_classes = TRAINING[index]["n_classes"]
    bags = []
    for _ in range(BAGS):
        N = int(torch.randint(16, 32, (), generator=gen))
        h = torch.randn(N, EMBED_DIM, generator=gen)
        bags.append((h, torch.randint(0, n_classes, (1,), generator=gen)))
    return bags


def train_losses(model, index):
    """CLAM's training loop on the bags of TRAINING run ``index``: per step, the total loss
    ``0.7 · cross-entropy(logits, label) + 0.3 · instance loss``, the bag loss and the instance
    loss. Dropout masks come from ``torch.manual_seed(5000 + index)``."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    torch.manual_seed(5000 + index)
    total, bag, inst = [], [], []
    for _ in range(EPOCHS):
        for h, label in training_bags(index):
            logits, _, _, _, results = model(h, label=label, instance_eval=True)
            bag_loss = F.cross_entropy(logits, label)
            loss = BAG_WEIGHT * bag_loss + (1 - BAG_WEIGHT) * results["instance_loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total.append(loss.item())
            bag.append(bag_loss.item())
            inst.append(results["instance_loss"].item())
    return {"loss": total, "bag_loss": bag, "instance_loss": inst}


def outputs(model, h, label):
    """What ``forward(h, label, instance_eval=True, return_features=True)`` returns, as a
    dict of tensors / arrays."""
    with torch.no_grad():
        logits, Y_prob, Y_hat, A_raw, results = model(h, label=label, instance_eval=True,
                                                      return_features=True)
    return {"logits": logits, "Y_prob": Y_prob, "Y_hat": Y_hat, "A_raw": A_raw,
            "features": results["features"], "instance_loss": results["instance_loss"],
            "inst_preds": results["inst_preds"], "inst_labels": results["inst_labels"]}


def _to_json(value):
    """Tensors and arrays as nested lists: floats as the shortest decimal that reads back as
    the same float32, integers as ints."""
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.dtype.kind in "iub":
        return arr.tolist()
    return np.vectorize(lambda v: float(str(np.float32(v))), otypes=[object])(arr).tolist() \
        if arr.ndim else float(str(np.float32(arr)))


def load_clam_models(clam_dir):
    """CLAM's ``models/model_clam.py`` from the checkout ``clam_dir``, as a module.

    The checkout goes on ``sys.path``; the file is loaded by itself, because CLAM's
    ``models/__init__.py`` also imports its feature encoders (which need timm)."""
    path = os.path.join(clam_dir, "models", "model_clam.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no CLAM checkout at {clam_dir!r}: {path} does not exist")
    clam_dir = os.path.abspath(clam_dir)
    if clam_dir not in sys.path:
        sys.path.insert(0, clam_dir)
    spec = importlib.util.spec_from_file_location("clam_checkout_model_clam", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_reference(clam_dir):
    """Run CLAM from ``clam_dir`` on every case and training run; the JSON-ready dict."""
    models = load_clam_models(clam_dir)
    classes = {"SB": models.CLAM_SB, "MB": models.CLAM_MB}
    path = os.path.join(clam_dir, "models", "model_clam.py")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    ref = {"about": ("Outputs of CLAM's CLAM_SB / CLAM_MB (mahmoodlab/CLAM, models/"
                     "model_clam.py) written by tests/clam_reference.py; numbers only."),
           "model_clam_sha256": digest, "torch": torch.__version__, "cases": {},
           "training": {}}
    for index, case in enumerate(CASES):
        w_seed, h_seed, drop_seed = seeds(index)
        clam = classes[case["model"]](**model_kwargs(case))
        shapes = {k: list(v.shape) for k, v in clam.state_dict().items()}
        weights = seeded_weights(shapes, w_seed)
        clam.load_state_dict(weights)
        h, label = seeded_bag(case["N"], h_seed), torch.tensor([case["label"]])
        entry = {"config": case, "state_dict_shapes": shapes,
                 "weights_sum": _to_json(sum(t.double().sum() for t in weights.values())),
                 "h_sum": _to_json(h.double().sum())}
        clam.eval()
        entry["eval"] = {k: _to_json(v) for k, v in outputs(clam, h, label).items()}
        if case["dropout"]:
            clam.train()
            torch.manual_seed(drop_seed)
            train = outputs(clam, h, label)
            del train["features"]  # the logits depend on them; leaving them out halves the file
            entry["train"] = {k: _to_json(v) for k, v in train.items()}
        ref["cases"][case["name"]] = entry
    for index, run in enumerate(TRAINING):
        clam = classes[run["model"]](**model_kwargs(run))
        shapes = {k: list(v.shape) for k, v in clam.state_dict().items()}
        clam.load_state_dict(seeded_weights(shapes, 6000 + index))
        losses = train_losses(clam, index)
        ref["training"][run["name"]] = {"config": run,
                                        **{k: _to_json(v) for k, v in losses.items()}}
    return ref


def write_json(ref, path):
    """``ref`` as JSON: indented objects, each list of numbers on one line."""
    def dump(value, indent):
        pad = " " * indent
        if isinstance(value, dict):
            items = [f'{pad}  {json.dumps(k)}: {dump(v, indent + 2).lstrip()}'
                     for k, v in value.items()]
            return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
        return pad + json.dumps(value)
    with open(path, "w") as f:
        f.write(dump(ref, 0) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clam-dir", required=True,
                        help="a CLAM checkout (the folder holding models/model_clam.py)")
    parser.add_argument("--out", default=DATA, help=f"the JSON file to write (default {DATA})")
    args = parser.parse_args(argv)
    write_json(make_reference(args.clam_dir), args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
