"""Core-neuron profiles stored in a GGUF's metadata (`cmx.*` keys): the format, its checks, and
the writer. `cmx-profile` (cmx.profile) computes a profile; cmx.Model reads it. Pure Python
(numpy and gguf-py), no torch.

A profile is what one calibration run learnt about a model's FFNs, per layer:

* `frequency`: each neuron's core frequency, the share of calibration tokens whose token-wise
  core neurons C_rho (docs/corematching.md) hold it;
* `neuron_order`: the neurons sorted by that frequency (descending, lower index first on ties),
  int32: its first n_core entries are the calibration set's C^beta;
* `tau`: an activation threshold such that "a_i(x) > tau" marks, on average over the calibration
  tokens, as many neurons per token as C_rho holds: rho without a per-token sort;
* model-wide: the recommended pruning layer K, kept-fraction bounds and the prompt length below
  which the stored table predicts a prompt's core neurons better than the prompt itself.

The file keeps every tensor and key of its source; the profile adds keys only (stock llama.cpp
refuses extra tensors, not extra keys, and skips array keys).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import numpy as np

PROFILE_VERSION = 1

KEY_VERSION = "cmx.version"
KEY_N_LAYER = "cmx.block_count"
KEY_N_FF = "cmx.feed_forward_length"
KEY_RHO = "cmx.rho"
KEY_BETA = "cmx.beta"
KEY_FREQUENCY = "cmx.core_frequency"  # float32 [n_layer * n_ff], layer-major
KEY_ORDER = "cmx.neuron_order"  # int32 [n_layer * n_ff], layer-major
KEY_TAU = "cmx.tau"  # float32 [n_layer]
KEY_PRUNE_LAYER = "cmx.prune_layer"
KEY_MIN_KEEP = "cmx.min_keep"
KEY_MAX_KEEP = "cmx.max_keep"
KEY_SHORT_PROMPT = "cmx.short_prompt_tokens"
KEY_SOURCE = "cmx.profile.source"
KEY_LORA = "cmx.profile.lora"
KEY_CALIBRATION_KIND = "cmx.profile.calibration.kind"
KEY_CALIBRATION_PROMPTS = "cmx.profile.calibration.prompts"
KEY_CALIBRATION_TOKENS = "cmx.profile.calibration.tokens"
KEY_DATE = "cmx.profile.date"
KEY_MEASURES = "cmx.profile.measures"  # JSON text: what the K / bounds / cutoff rules measured

CALIBRATION_KINDS = ("scenes", "images", "prompts")


class ProfileError(ValueError):
    """The `cmx.*` profile of a GGUF is malformed or does not fit the model it is stored in."""


@dataclass
class CoreProfile:
    n_layer: int
    n_ff: int
    rho: float
    beta: float
    frequency: np.ndarray  # float32 [n_layer, n_ff], in [0, 1]
    neuron_order: np.ndarray  # int32 [n_layer, n_ff], each row a permutation of range(n_ff)
    tau: np.ndarray  # float32 [n_layer]
    prune_layer: int
    min_keep: float
    max_keep: float
    short_prompt_tokens: int
    source: str = ""
    lora: str = ""
    calibration_kind: str = "scenes"
    calibration_prompts: int = 0
    calibration_tokens: int = 0
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    measures: str = "{}"
    version: int = PROFILE_VERSION

    def core_table(self, layer: int, n_core: int) -> np.ndarray:
        """The calibration set's C^beta of a layer with n_core neurons: ascending int32."""
        return np.sort(self.neuron_order[layer, :n_core]).astype(np.int32)

    def check(self) -> "CoreProfile":
        """Raises ProfileError unless every field is in range and the arrays fit (n_layer, n_ff)."""
        L, F = int(self.n_layer), int(self.n_ff)
        if self.version != PROFILE_VERSION:
            raise ProfileError(f"cmx.version is {self.version}; this cmx reads profile version {PROFILE_VERSION} "
                               "(profile the model again with this cmx's cmx-profile)")
        if L <= 0 or F <= 0:
            raise ProfileError(f"cmx.block_count ({L}) and cmx.feed_forward_length ({F}) must be positive")
        for name, v in (("cmx.rho", self.rho), ("cmx.beta", self.beta)):
            if not (0.0 < v <= 1.0):
                raise ProfileError(f"{name} must be in (0, 1], got {v!r}")
        if not (0.0 <= self.min_keep <= self.max_keep <= 1.0):
            raise ProfileError(f"need 0 <= cmx.min_keep <= cmx.max_keep <= 1, got {self.min_keep!r}, {self.max_keep!r}")
        if not 0 <= self.prune_layer <= L - 2:
            raise ProfileError(f"cmx.prune_layer {self.prune_layer} is not in [0, {L - 2}] for {L} layers")
        if not 0 <= self.short_prompt_tokens <= 2**31 - 1:  # the engine's count is an int
            raise ProfileError(f"cmx.short_prompt_tokens must be in [0, 2147483647], got {self.short_prompt_tokens}")
        for name, arr, n in ((KEY_FREQUENCY, self.frequency, L * F), (KEY_ORDER, self.neuron_order, L * F), (KEY_TAU, self.tau, L)):
            if arr.size != n:  # Python integers: a product of huge sizes cannot wrap to the array's length
                raise ProfileError(f"{name} holds {arr.size} values; {L} layers x n_ff {F} need {n}")
        order = np.asarray(self.neuron_order)
        if order.size and (order.min() < 0 or order.max() >= F):  # before the cast: 2^32 + i is not i
            raise ProfileError(f"{KEY_ORDER} holds neuron indices outside [0, {F})")
        self.frequency = np.asarray(self.frequency, np.float32).reshape(L, F)
        self.neuron_order = np.asarray(self.neuron_order, np.int32).reshape(L, F)
        self.tau = np.asarray(self.tau, np.float32).reshape(L)
        if not np.all(np.isfinite(self.frequency)) or self.frequency.min() < 0 or self.frequency.max() > 1:
            raise ProfileError(f"{KEY_FREQUENCY} values must be finite shares in [0, 1]")
        if not np.all(np.isfinite(self.tau)):
            raise ProfileError(f"{KEY_TAU} values must be finite")
        order = self.neuron_order
        if order.min() < 0 or order.max() >= F:
            raise ProfileError(f"{KEY_ORDER} holds neuron indices outside [0, {F})")
        if not np.all(np.sort(order, axis=1) == np.arange(F, dtype=np.int32)[None]):
            raise ProfileError(f"each layer's {KEY_ORDER} must list every neuron once")
        return self


# ---------------------------------------------------------------------------------------------
# Reading


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


def read_cmx_keys(path: str | os.PathLike) -> dict:
    """The `cmx.*` keys of a GGUF: key -> value (str, int/float, or a numpy array for a numeric
    array; a string array -> list of str). Only the key section is walked, from a memory map, with
    every length checked against the file (gguf-py's reader decodes the whole tokenizer first:
    seconds on a real model; this takes milliseconds)."""
    import mmap
    import struct

    with open(os.fspath(path), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ProfileError(f"{os.fspath(path)}: not a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos = 0

            def take(n: int) -> int:
                nonlocal pos
                if n < 0 or pos + n > size:
                    raise ProfileError(f"{os.fspath(path)}: a metadata length runs past the end of the file")
                start, pos = pos, pos + n
                return start

            def scalar(fmt: str):
                return struct.unpack_from(fmt, mm, take(struct.calcsize(fmt)))[0]

            def string() -> bytes:
                n = scalar("<Q")
                return mm[take(n) : pos]

            def value(vtype: int, keep: bool):
                if vtype in _SCALARS:
                    return scalar(_SCALARS[vtype])
                if vtype == _STRING:
                    s = string()
                    return s.decode("utf-8", errors="replace") if keep else None
                if vtype != _ARRAY:
                    raise ProfileError(f"{os.fspath(path)}: unknown metadata value type {vtype}")
                item, n = scalar("<I"), scalar("<Q")
                if item in _NUMPY:
                    width = struct.calcsize(_SCALARS[item])
                    at = take(n * width)
                    return np.frombuffer(mm, _NUMPY[item], n, at).copy() if keep else None
                if item == _STRING:
                    items = [value(_STRING, keep) for _ in range(n)]
                    return items if keep else None
                raise ProfileError(f"{os.fspath(path)}: metadata array of type {item}")

            if mm[:4] != b"GGUF":
                raise ProfileError(f"{os.fspath(path)}: not a GGUF file")
            take(4)
            scalar("<I")  # version
            scalar("<Q")  # tensor count
            n_kv = scalar("<Q")
            out = {}
            for _ in range(n_kv):
                key = string().decode("utf-8", errors="replace")
                keep = key.startswith("cmx.")
                v = value(scalar("<I"), keep)
                if keep:
                    out[key] = v
            return out


def read_profile(path, n_layer: int | None = None, n_ff: int | None = None) -> CoreProfile | None:
    """The profile stored in a GGUF (None when it has no `cmx.*` key), checked: against itself,
    and against the model's n_layer / n_ff when given. Raises ProfileError on any mismatch."""
    keys = read_cmx_keys(path)
    if not keys:
        return None

    def need(key: str, kind):
        v = keys.get(key)
        if v is None:
            raise ProfileError(f"the cmx profile lacks {key} (profile the model again with cmx-profile)")
        if kind is np.ndarray:
            if not isinstance(v, np.ndarray):
                raise ProfileError(f"{key} must be a numeric array")
            return v
        if isinstance(v, (list, np.ndarray)):
            raise ProfileError(f"{key} must be a single value, not an array")
        if kind is str:
            if not isinstance(v, str):
                raise ProfileError(f"{key} must be a string")
            return v
        if isinstance(v, str):
            raise ProfileError(f"{key} must be a number, got the string {v!r}")
        if kind is int and isinstance(v, float):
            raise ProfileError(f"{key} must be an integer, got {v!r}")
        return kind(v)

    def text(key: str) -> str:
        v = keys.get(key)
        return v if isinstance(v, str) else ""

    def count(key: str) -> int:
        v = keys.get(key)
        return int(v) if isinstance(v, (int, np.integer)) else 0

    version = need(KEY_VERSION, int)
    if version != PROFILE_VERSION:  # checked first: a newer format may name its keys differently
        raise ProfileError(f"cmx.version is {version}; this cmx reads profile version {PROFILE_VERSION} "
                           "(profile the model again with this cmx's cmx-profile)")
    order = need(KEY_ORDER, np.ndarray)
    if order.dtype.kind not in "iu":
        raise ProfileError(f"{KEY_ORDER} must be an integer array")
    p = CoreProfile(
        n_layer=need(KEY_N_LAYER, int), n_ff=need(KEY_N_FF, int), rho=need(KEY_RHO, float), beta=need(KEY_BETA, float),
        frequency=need(KEY_FREQUENCY, np.ndarray), neuron_order=order, tau=need(KEY_TAU, np.ndarray),
        prune_layer=need(KEY_PRUNE_LAYER, int), min_keep=need(KEY_MIN_KEEP, float), max_keep=need(KEY_MAX_KEEP, float),
        short_prompt_tokens=need(KEY_SHORT_PROMPT, int), source=text(KEY_SOURCE), lora=text(KEY_LORA),
        calibration_kind=text(KEY_CALIBRATION_KIND), calibration_prompts=count(KEY_CALIBRATION_PROMPTS),
        calibration_tokens=count(KEY_CALIBRATION_TOKENS), date=text(KEY_DATE), measures=text(KEY_MEASURES) or "{}",
        version=version,
    )
    p.check()
    if n_layer is not None and p.n_layer != n_layer:
        raise ProfileError(f"the cmx profile is for {p.n_layer} layers but the model has {n_layer}: "
                           "it belongs to another model")
    if n_ff is not None and p.n_ff != n_ff:
        raise ProfileError(f"the cmx profile is for n_ff {p.n_ff} but the model has n_ff {n_ff}: it belongs to another model")
    return p


# ---------------------------------------------------------------------------------------------
# Writing


def profile_keys(p: CoreProfile) -> list[tuple[str, object, object, object]]:
    """(key, value, GGUFValueType, array sub-type) of every key a profile adds."""
    from gguf import GGUFValueType as T

    arr = T.ARRAY
    return [
        (KEY_VERSION, p.version, T.UINT32, None),
        (KEY_N_LAYER, p.n_layer, T.UINT32, None),
        (KEY_N_FF, p.n_ff, T.UINT32, None),
        (KEY_RHO, p.rho, T.FLOAT32, None),
        (KEY_BETA, p.beta, T.FLOAT32, None),
        (KEY_PRUNE_LAYER, p.prune_layer, T.UINT32, None),
        (KEY_MIN_KEEP, p.min_keep, T.FLOAT32, None),
        (KEY_MAX_KEEP, p.max_keep, T.FLOAT32, None),
        (KEY_SHORT_PROMPT, p.short_prompt_tokens, T.UINT32, None),
        (KEY_SOURCE, p.source or "unknown", T.STRING, None),
        (KEY_LORA, p.lora or "none", T.STRING, None),
        (KEY_CALIBRATION_KIND, p.calibration_kind, T.STRING, None),
        (KEY_CALIBRATION_PROMPTS, p.calibration_prompts, T.UINT32, None),
        (KEY_CALIBRATION_TOKENS, p.calibration_tokens, T.UINT64, None),
        (KEY_DATE, p.date, T.STRING, None),
        (KEY_MEASURES, p.measures, T.STRING, None),
        # gguf-py packs arrays from Python sequences
        (KEY_TAU, np.asarray(p.tau, np.float32).reshape(-1).tolist(), arr, T.FLOAT32),
        (KEY_FREQUENCY, np.asarray(p.frequency, np.float32).reshape(-1).tolist(), arr, T.FLOAT32),
        (KEY_ORDER, np.asarray(p.neuron_order, np.int32).reshape(-1).tolist(), arr, T.INT32),
    ]


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def write_profiled_gguf(src: str | os.PathLike, dst: str | os.PathLike, profile: CoreProfile) -> None:
    """Writes dst: src's header keys and tensors unchanged (tensor bytes copied as they are, the
    same alignment), an older `cmx.*` profile of src dropped, and the profile's keys added.
    Refuses dst == src: the input is never overwritten."""
    profile.check()
    copy_gguf_with_keys(src, dst, profile_keys(profile))


def copy_gguf_with_keys(src: str | os.PathLike, dst: str | os.PathLike, keys: list) -> None:
    """src with its `cmx.*` keys replaced by `keys` ((key, value, GGUFValueType, sub-type)),
    unchecked (tests write malformed profiles with it). Written to dst + ".partial", then renamed."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys

    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.exists(dst) and _same_file(src, dst):
        raise ValueError(f"the output {dst} is the input model: cmx-profile never overwrites its input (choose another -o)")
    reader = GGUFReader(src, "r")
    arch_field = reader.fields.get(Keys.General.ARCHITECTURE)
    arch = arch_field.contents() if arch_field is not None else None
    if not isinstance(arch, str):
        raise ProfileError(f"{src} has no general.architecture")
    tmp = dst + ".partial"
    writer = GGUFWriter(tmp, arch, endianess=reader.endianess)
    try:
        for f in reader.fields.values():
            # virtual GGUF.* fields and the architecture (the writer adds it first) are not copied;
            # nor is an earlier profile, which the new one replaces
            if f.name.startswith("GGUF.") or f.name == Keys.General.ARCHITECTURE or f.name.startswith("cmx."):
                continue
            kind = f.types[0]
            sub = f.types[-1] if kind == GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), kind, sub_type=sub)
            if f.name == Keys.General.ALIGNMENT:
                writer.data_alignment = int(f.contents())  # tensors keep the file's alignment
        for key, value, kind, sub in keys:
            writer.add_key_value(key, value, kind, sub_type=sub)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
