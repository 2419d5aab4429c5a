#!/usr/bin/env python3
"""Write the tiny SAE fixtures of crates/sae/tests/fixtures/ in the exact format of
OpenAI's GPT-2 SAE files (`torch.save` of a dict, zip layout, pickle protocol 2), without
needing torch: the pickle references torch's globals by name exactly as torch.save does
(`torch._utils._rebuild_tensor_v2`, `torch FloatStorage`, persistent ids
('storage', StorageType, key, 'cpu', numel)).

Run from the repository root: python3 scripts/make-sae-fixtures.py
"""
import collections
import json
import pickle
import random
import struct
import sys
import types
import zipfile

torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")
sys.modules["torch"], sys.modules["torch._utils"] = torch, utils


def _rebuild_tensor_v2(*args):  # referenced by name only
    raise NotImplementedError


_rebuild_tensor_v2.__module__ = "torch._utils"
utils._rebuild_tensor_v2 = _rebuild_tensor_v2
STORAGE = {}
for name in ["FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage"]:
    cls = type(name, (), {})
    cls.__module__ = "torch"
    setattr(torch, name, cls)
    STORAGE[name] = cls


class Storage:
    def __init__(self, kind, key, values):
        self.kind, self.key, self.values = kind, key, values


class Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, tuple(shape)
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.insert(0, acc)
            acc *= s
        self.stride = tuple(stride)

    def __reduce__(self):
        return (_rebuild_tensor_v2, (self.storage, 0, self.shape, self.stride, False, collections.OrderedDict()))


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", STORAGE[obj.kind], obj.key, "cpu", len(obj.values))
        return None


def encode(kind, values):
    if kind == "FloatStorage":
        return struct.pack(f"<{len(values)}f", *values)
    if kind == "HalfStorage":
        return struct.pack(f"<{len(values)}e", *values)
    if kind == "LongStorage":
        return struct.pack(f"<{len(values)}q", *values)
    if kind == "BFloat16Storage":  # round-to-nearest-even of the f32 bits
        out = b""
        for v in values:
            bits = struct.unpack("<I", struct.pack("<f", v))[0]
            bits += 0x7FFF + ((bits >> 16) & 1)
            out += struct.pack("<H", bits >> 16)
        return out
    raise ValueError(kind)


def save(path, entries, archive="fixture"):
    """entries: dict name -> (kind, shape, values) for tensors, or a plain value."""
    storages, obj = [], {}
    for name, value in entries.items():
        if isinstance(value, tuple) and len(value) == 3 and value[0] in STORAGE:
            kind, shape, values = value
            st = Storage(kind, str(len(storages)), values)
            storages.append(st)
            obj[name] = Tensor(st, shape)
        else:
            obj[name] = value
    import io

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive}/data.pkl", buf.getvalue())
        z.writestr(f"{archive}/byteorder", "little")
        for st in storages:
            z.writestr(f"{archive}/data/{st.key}", encode(st.kind, st.values))
        z.writestr(f"{archive}/version", "3\n")


def sae_entries(d, c, k, kind="FloatStorage", seed=0):
    rng = random.Random(seed)
    r = lambda n, s: [round(rng.gauss(0, s), 4) for _ in range(n)]
    return {
        "pre_bias": (kind, [d], r(d, 0.1)),
        "encoder.weight": (kind, [c, d], r(c * d, 0.5)),
        "latent_bias": (kind, [c], r(c, 0.1)),
        "decoder.weight": (kind, [d, c], r(d * c, 0.5)),
        "stats_last_nonzero": ("LongStorage", [c], [0] * c),
        "latents_activation_frequency": ("FloatStorage", [c], [0.0] * c),
        "latents_mean_square": ("FloatStorage", [c], [0.0] * c),
        "activation": "TopK",
        "activation_state_dict": {"k": k, "postact_fn": "ReLU"},
    }


def main():
    out = "crates/sae/tests/fixtures"
    d, c, k = 6, 10, 3
    save(f"{out}/tiny.pt", sae_entries(d, c, k))
    save(f"{out}/tiny-f16.pt", sae_entries(d, c, k, "HalfStorage"))
    save(f"{out}/tiny-bf16.pt", sae_entries(d, c, k, "BFloat16Storage"))
    e = sae_entries(d, c, k)
    del e["decoder.weight"]
    save(f"{out}/missing-decoder.pt", e)
    e = sae_entries(d, c, k)
    e["activation"] = "ReLU"
    save(f"{out}/relu-activation.pt", e)
    e = sae_entries(d, c, k)
    e["latent_bias"] = ("FloatStorage", [c + 1], [0.0] * (c + 1))
    save(f"{out}/bad-shape.pt", e)
    e = sae_entries(d, c, k)
    e["activation_state_dict"] = {"postact_fn": "ReLU"}
    save(f"{out}/no-k.pt", e)
    # The f32 values, for the loader test to compare against.
    ref = {n: v[2] for n, v in sae_entries(d, c, k).items() if isinstance(v, tuple) and v[0] == "FloatStorage"}
    json.dump(ref, open(f"{out}/tiny.json", "w"))


if __name__ == "__main__":
    main()
