#!/usr/bin/env python3
"""hfref: an independent numpy transliteration of HuggingFace's DeepSeek-V2/V3
modeling code, used to check expertmesh's Go engine.

It is written from DeepSeek's remote code (`modeling_deepseek.py` shipped with
deepseek-ai/DeepSeek-V2, DeepSeek-V2-Lite and DeepSeek-V3 on the Hub) and
transformers' `models/deepseek_v2` / `models/deepseek_v3`, never from the Go
code. Everything runs in float32 (weights are upcast at load, as
`from_pretrained(..., torch_dtype=torch.float32)` does); the whole sequence is
recomputed every step (no cache: this is a reference, not an engine); decoding
is greedy.

Where the HF variants differ we follow DeepSeek's remote code:

1. Routing weights after top-k.
   - V2 remote code (MoEGate.forward):
         if self.top_k > 1 and self.norm_topk_prob: w = w / (w.sum() + 1e-20)
         else: w = w * self.routed_scaling_factor
     i.e. normalise OR scale, never both.
   - V3 remote code: normalise if top_k > 1 and norm_topk_prob, THEN always
     `w = w * self.routed_scaling_factor  # must multiply the scaling factor`.
   - transformers deepseek_v2 (DeepseekV2Moe.route_tokens_to_experts) ignores
     norm_topk_prob and always scales; transformers deepseek_v3 normalises when
     norm_topk_prob (without the top_k > 1 test) and then scales.
   Real V2/V2-Lite configs have norm_topk_prob=false, so the V2 variants agree
   there. We pick the rule by model_type (deepseek_v3 -> V3 rule), overridable
   with --norm-rule.
2. Group masking. V2 group_limited_greedy: group score = max prob in the
   group, non-selected groups masked_fill(..., 0.0) before top-k (softmax
   scores are > 0 so 0.0 acts like -inf). V3 noaux_tc: choice score =
   sigmoid + e_score_correction_bias, group score = sum of the group's top-2
   choice scores; transformers and the first DeepSeek-V3 remote code mask
   non-selected groups with 0.0, some later copies of the remote code with
   float("-inf"). They differ only when a selected group holds a negative
   biased score (then 0.0 lets a masked expert win, and among the tied 0.0s
   we take the lowest expert ids; torch.topk leaves that order unspecified).
   Default 0.0, --noaux-mask-fill=-inf for the other. The gate weights are the UNBIASED
   sigmoid scores gathered at the chosen ids (scores.gather).
3. Softmax scale. Remote code (V2 and V3) and transformers deepseek_v3:
   q_head_dim**-0.5, times yarn_get_mscale(factor, mscale_all_dim)**2 when
   rope_scaling has a non-zero mscale_all_dim. The transformers deepseek_v2
   version we read does NOT apply the mscale**2 factor (scaling =
   qk_head_dim**-0.5 only).
4. RoPE. Remote code: YaRN inv_freq blend with yarn_find_correction_range
   (floor/ceil, clamped) and linear ramp; cos/sin multiplied by
   yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim);
   q_pe/k_pe are de-interleaved (view(d/2, 2).transpose) and then rotated with
   rotate_half, i.e. pairs are (x[2i], x[2i+1]). transformers deepseek_v2
   rotates the same (2i, 2i+1) pairs through complex multiplication
   (equivalent up to the output permutation, which q and k share);
   transformers deepseek_v3 does the same de-interleave when rope_interleave.
   transformers computes YaRN in modeling_rope_utils (its own attention
   factor rule); we follow the remote code.
5. Dense vs MoE layers. Remote code: MoE iff n_routed_experts is not None and
   layer_idx >= first_k_dense_replace and layer_idx % moe_layer_freq == 0.
   transformers (both) ignores moe_layer_freq: MoE iff layer_idx >=
   first_k_dense_replace.
6. Scoring functions. V2 remote code accepts only softmax, V3 remote code
   only sigmoid with noaux_tc; we accept either with any top-k method.
7. q_a_layernorm and kv_a_layernorm are built with the RMSNorm default
   eps=1e-6, NOT config.rms_norm_eps (all of V2/V3, remote and transformers).
8. V3's multi-token-prediction layer (model.layers.{num_hidden_layers}.*) is
   not part of the decoder; it is never read.
9. lm_head: tied to embed_tokens only when config.tie_word_embeddings is true
   (DeepSeek configs default it to false). Logits are float32.

Output: one JSON object shaped like `expertmesh generate --json`.
"""

import argparse
import json
import math
import os
import struct
import sys
import time

try:
    import numpy as np
except ImportError:  # the Go test probes for this and skips or fails itself
    sys.stderr.write("hfref: numpy is required (apt-get install python3-numpy)\n")
    sys.exit(3)

F32 = np.float32


class RefError(Exception):
    """Bad input or a checkpoint we cannot read: reported without a traceback."""


# ---------------------------------------------------------------------------
# safetensors


def _fp8_e4m3fn_table():
    # E4M3 "fn": 1 sign, 4 exponent (bias 7), 3 mantissa bits, no infinities,
    # S.1111.111 is NaN.
    t = np.zeros(256, dtype=np.float32)
    for b in range(256):
        s = -1.0 if b & 0x80 else 1.0
        e = (b >> 3) & 0xF
        m = b & 0x7
        if e == 0xF and m == 0x7:
            v = float("nan")
        elif e == 0:
            v = (m / 8.0) * 2.0 ** -6
        else:
            v = (1.0 + m / 8.0) * 2.0 ** (e - 7)
        t[b] = s * v
    return t


class SafeTensors:
    """Reads HF-layout safetensors (single file or sharded with an index)."""

    def __init__(self, model_dir, block=(128, 128)):
        self.dir = model_dir
        self.block = tuple(block)  # FP8 weight_block_size
        self.keep = True  # cache converted tensors (off: re-read per use, for big checkpoints)
        self.where = {}  # name -> (path, dtype, shape, begin, end)
        self.cache = {}
        files = []
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                wm = json.load(f).get("weight_map", {})
            files = sorted(set(wm.values()))
        else:
            files = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
        if not files:
            raise RefError("no safetensors files in %s" % model_dir)
        for name in files:
            self._read_header(os.path.join(model_dir, name))

    def _read_header(self, path):
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise RefError("%s: shorter than the 8-byte header length" % path)
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8 or n > 100 << 20:
                    raise RefError("%s: header length %d does not fit the file" % (path, n))
                hdr = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise RefError("%s: %s" % (path, e))
        base = 8 + n
        for name, meta in hdr.items():
            if name == "__metadata__":
                continue
            b, e = meta["data_offsets"]
            if base + e > size or b > e:
                raise RefError("%s: tensor %s [%d,%d) runs past the file" % (path, name, b, e))
            self.where[name] = (path, meta["dtype"], tuple(meta["shape"]), base + b, base + e)

    def has(self, name):
        return name in self.where

    def raw(self, name):
        if name not in self.where:
            raise RefError("tensor %s is missing from the checkpoint" % name)
        path, dtype, shape, b, e = self.where[name]
        count = int(np.prod(shape)) if shape else 1
        sizes = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "I64": 8, "I32": 4}
        if dtype not in sizes:
            raise RefError("tensor %s: dtype %s is not supported" % (name, dtype))
        if e - b != count * sizes[dtype]:
            raise RefError("tensor %s: %d bytes for %s %s" % (name, e - b, dtype, shape))
        with open(path, "rb") as f:
            f.seek(b)
            buf = f.read(e - b)
        if dtype == "BF16":
            # bf16 is the high half of an f32: shift into place.
            u = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            a = u.view(np.float32)
        elif dtype == "F16":
            a = np.frombuffer(buf, dtype="<f2").astype(F32)
        elif dtype == "F32":
            a = np.frombuffer(buf, dtype="<f4").astype(F32)
        elif dtype == "F64":
            a = np.frombuffer(buf, dtype="<f8").astype(F32)
        elif dtype == "F8_E4M3":
            a = _fp8_e4m3fn_table()[np.frombuffer(buf, dtype=np.uint8)]
        else:
            a = np.frombuffer(buf, dtype="<i8" if dtype == "I64" else "<i4").astype(F32)
        return dtype, a.reshape(shape)

    def get(self, name, shape=None):
        """Tensor `name` as float32, FP8 blocks dequantised with *_scale_inv."""
        if name in self.cache:
            return self.cache[name]
        dtype, a = self.raw(name)
        if dtype == "F8_E4M3":
            sname = name + "_scale_inv"
            if not self.has(sname):
                raise RefError("tensor %s is F8_E4M3 but %s is missing" % (name, sname))
            _, s = self.raw(sname)
            if a.ndim != 2 or s.ndim != 2:
                raise RefError("tensor %s: FP8 block scales need 2-D tensors" % name)
            bo, bi = self.block
            if s.shape != (-(-a.shape[0] // bo), -(-a.shape[1] // bi)):
                raise RefError("tensor %s: scales %s do not tile %s in %dx%d blocks"
                               % (sname, s.shape, a.shape, bo, bi))
            full = np.repeat(np.repeat(s, bo, axis=0), bi, axis=1)[: a.shape[0], : a.shape[1]]
            a = (a * full).astype(F32)
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise RefError("tensor %s has shape %s, want %s" % (name, tuple(a.shape), tuple(shape)))
        a = np.ascontiguousarray(a, dtype=F32)
        if self.keep:
            self.cache[name] = a
        return a


# ---------------------------------------------------------------------------
# the model, transliterated


def yarn_find_correction_dim(num_rotations, dim, base=10000, max_position_embeddings=2048):
    return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (
        2 * math.log(base)
    )


def yarn_find_correction_range(low_rot, high_rot, dim, base=10000, max_position_embeddings=2048):
    low = math.floor(yarn_find_correction_dim(low_rot, dim, base, max_position_embeddings))
    high = math.ceil(yarn_find_correction_dim(high_rot, dim, base, max_position_embeddings))
    return max(low, 0), min(high, dim - 1)


def yarn_get_mscale(scale=1, mscale=1):
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_linear_ramp_mask(lo, hi, dim):
    if lo == hi:
        hi += 0.001
    linear = (np.arange(dim, dtype=F32) - F32(lo)) / F32(hi - lo)
    return np.clip(linear, 0, 1).astype(F32)


def rope_cos_sin(cfg, seq_len):
    """cos/sin [seq_len, rope_dim] as DeepseekV2*RotaryEmbedding caches them."""
    dim = cfg["qk_rope_head_dim"]
    base = float(cfg.get("rope_theta", 10000.0))
    rs = cfg.get("rope_scaling")
    ar = np.arange(0, dim, 2, dtype=F32) / F32(dim)
    t = np.arange(seq_len, dtype=F32)
    mscale = 1.0
    if rs is None:
        inv_freq = (F32(1.0) / (F32(base) ** ar)).astype(F32)
    else:
        typ = rs.get("type", rs.get("rope_type"))
        factor = float(rs["factor"])
        if typ == "linear":
            inv_freq = (F32(1.0) / (F32(base) ** ar)).astype(F32)
            t = (t / F32(factor)).astype(F32)
        elif typ == "dynamic":
            mpe = cfg["max_position_embeddings"]
            b = base
            if seq_len > mpe:
                b = base * ((factor * seq_len / mpe) - (factor - 1)) ** (dim / (dim - 2))
            inv_freq = (F32(1.0) / (F32(b) ** ar)).astype(F32)
        elif typ == "yarn":
            omp = rs.get("original_max_position_embeddings", 4096)
            beta_fast = rs.get("beta_fast", 32)
            beta_slow = rs.get("beta_slow", 1)
            ms = rs.get("mscale", 1)
            msa = rs.get("mscale_all_dim", 0)
            freq_extra = (F32(1.0) / (F32(base) ** ar)).astype(F32)
            freq_inter = (F32(1.0) / (F32(factor) * (F32(base) ** ar))).astype(F32)
            low, high = yarn_find_correction_range(beta_fast, beta_slow, dim, base, omp)
            inv_freq_mask = F32(1.0) - yarn_linear_ramp_mask(low, high, dim // 2)
            inv_freq = (freq_inter * (F32(1) - inv_freq_mask) + freq_extra * inv_freq_mask).astype(F32)
            mscale = float(yarn_get_mscale(factor, ms) / yarn_get_mscale(factor, msa))
        else:
            raise RefError("unknown rope_scaling type %r" % typ)
    freqs = np.outer(t, inv_freq).astype(F32)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos = (np.cos(emb) * F32(mscale)).astype(F32)
    sin = (np.sin(emb) * F32(mscale)).astype(F32)
    return cos, sin


def softmax_scale(cfg):
    q_head_dim = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    s = q_head_dim ** (-0.5)
    rs = cfg.get("rope_scaling")
    if rs is not None:
        msa = rs.get("mscale_all_dim", 0)
        factor = rs["factor"]
        if msa:
            m = yarn_get_mscale(factor, msa)
            s = s * m * m
    return s


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rotary(x, cos, sin):
    """x [..., T, d]: DeepSeek's interleaved pairs, as apply_rotary_pos_emb."""
    d = x.shape[-1]
    x = x.reshape(x.shape[:-1] + (d // 2, 2)).swapaxes(-1, -2).reshape(x.shape[:-2] + (x.shape[-2], d))
    return (x * cos + rotate_half(x) * sin).astype(F32)


def rms_norm(x, w, eps):
    x = x.astype(F32)
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=F32)
    return (w * (x * (F32(1.0) / np.sqrt(var + F32(eps))))).astype(F32)


def silu(x):
    return (x / (F32(1.0) + np.exp(-x))).astype(F32)


def softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return (e / np.sum(e, axis=axis, keepdims=True)).astype(F32)


def sigmoid(x):
    return (F32(1.0) / (F32(1.0) + np.exp(-x))).astype(F32)


def topk_idx(x, k):
    # torch.topk(sorted=False): the set is what matters; order by value, ties
    # to the lower index (argsort is stable on the negated values).
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


class Model:
    def __init__(self, model_dir, noaux_fill=0.0, norm_rule="auto"):
        try:
            with open(os.path.join(model_dir, "config.json")) as f:
                self.cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise RefError("config.json: %s" % e)
        c = self.cfg
        need = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size"]
        for k in need:
            if not isinstance(c.get(k), int) or c[k] <= 0:
                raise RefError("config.json: %s must be a positive integer, got %r" % (k, c.get(k)))
        self.eos = []
        gpath = os.path.join(model_dir, "generation_config.json")
        eos = c.get("eos_token_id")
        if os.path.exists(gpath):
            try:
                with open(gpath) as f:
                    g = json.load(f)
            except (OSError, ValueError) as e:
                raise RefError("generation_config.json: %s" % e)
            if "eos_token_id" in g:
                eos = g["eos_token_id"]
        if eos is not None:
            self.eos = list(eos) if isinstance(eos, list) else [eos]
        qc = c.get("quantization_config") or {}
        block = qc.get("weight_block_size") or [128, 128]
        if len(block) != 2 or not all(isinstance(x, int) and x > 0 for x in block):
            raise RefError("config.json: quantization_config.weight_block_size %r is not two sizes" % (block,))
        self.st = SafeTensors(model_dir, block)
        self.noaux_fill = noaux_fill
        if norm_rule == "auto":
            norm_rule = "v3" if c.get("model_type") == "deepseek_v3" else "v2"
        self.norm_rule = norm_rule
        self.scale = softmax_scale(c)

    def w(self, name, shape=None):
        return self.st.get(name, shape)

    def linear(self, x, name, out_dim, in_dim):
        y = x @ self.w(name + ".weight", (out_dim, in_dim)).T
        if self.st.has(name + ".bias"):
            y = y + self.w(name + ".bias", (out_dim,))
        return y.astype(F32)

    def mlp(self, x, p, inter):
        H = self.cfg["hidden_size"]
        g = self.linear(x, p + ".gate_proj", inter, H)
        u = self.linear(x, p + ".up_proj", inter, H)
        return self.linear(silu(g) * u, p + ".down_proj", H, inter)

    def attention(self, x, p, cos, sin):
        c = self.cfg
        T, H = x.shape
        nh = c["num_attention_heads"]
        nope, rope, vd = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        qd = nope + rope
        r = c["kv_lora_rank"]
        ql = c.get("q_lora_rank")
        if ql is None:
            q = self.linear(x, p + ".q_proj", nh * qd, H)
        else:
            qa = self.linear(x, p + ".q_a_proj", ql, H)
            qa = rms_norm(qa, self.w(p + ".q_a_layernorm.weight", (ql,)), 1e-6)
            q = self.linear(qa, p + ".q_b_proj", nh * qd, ql)
        q = q.reshape(T, nh, qd).transpose(1, 0, 2)  # [nh, T, qd]
        q_nope, q_pe = q[..., :nope], q[..., nope:]
        ckv = self.linear(x, p + ".kv_a_proj_with_mqa", r + rope, H)
        latent, k_pe = ckv[:, :r], ckv[:, r:]
        k_pe = k_pe.reshape(1, T, rope)
        kv = self.linear(rms_norm(latent, self.w(p + ".kv_a_layernorm.weight", (r,)), 1e-6),
                         p + ".kv_b_proj", nh * (nope + vd), r)
        kv = kv.reshape(T, nh, nope + vd).transpose(1, 0, 2)
        k_nope, v = kv[..., :nope], kv[..., nope:]
        q_pe = apply_rotary(q_pe, cos[:T], sin[:T])
        k_pe = apply_rotary(k_pe, cos[:T], sin[:T])
        qs = np.concatenate([q_nope, q_pe], axis=-1)
        ks = np.concatenate([k_nope, np.broadcast_to(k_pe, (nh, T, rope))], axis=-1)
        s = (qs @ ks.transpose(0, 2, 1)).astype(F32) * F32(self.scale)
        mask = np.triu(np.ones((T, T), dtype=bool), 1)
        s = np.where(mask[None], F32(-np.inf), s).astype(F32)
        a = softmax(s, axis=-1) @ v  # [nh, T, vd]
        a = a.transpose(1, 0, 2).reshape(T, nh * vd).astype(F32)
        return self.linear(a, p + ".o_proj", H, nh * vd)

    def route(self, x, p):
        c = self.cfg
        H = x.shape[1]
        E = c["n_routed_experts"]
        k = c["num_experts_per_tok"]
        logits = (x.astype(F32) @ self.w(p + ".gate.weight", (E, H)).T).astype(F32)
        sf = c.get("scoring_func", "softmax")
        if sf == "softmax":
            scores = softmax(logits, axis=-1)
        elif sf == "sigmoid":
            scores = sigmoid(logits)
        else:
            raise RefError("unsupported scoring_func %r" % sf)
        method = c.get("topk_method", "greedy")
        ng, tg = c.get("n_group") or 1, c.get("topk_group") or 1
        T = x.shape[0]
        if method in ("greedy", "gready"):  # early V2 remote code spelled it "gready"
            idx = topk_idx(scores, k)
            wts = np.take_along_axis(scores, idx, axis=-1)
        elif method == "group_limited_greedy":
            gs = scores.reshape(T, ng, E // ng).max(axis=-1)
            gidx = topk_idx(gs, tg)
            gmask = np.zeros((T, ng), dtype=bool)
            np.put_along_axis(gmask, gidx, True, axis=-1)
            smask = np.repeat(gmask, E // ng, axis=-1)
            tmp = np.where(smask, scores, F32(0.0)).astype(F32)
            idx = topk_idx(tmp, k)
            wts = np.take_along_axis(tmp, idx, axis=-1)
        elif method == "noaux_tc":
            bias = self.w(p + ".gate.e_score_correction_bias", (E,))
            choice = (scores + bias[None, :]).astype(F32)
            g = choice.reshape(T, ng, E // ng)
            top2 = -np.sort(-g, axis=-1)[..., :2]
            gs = top2.sum(axis=-1, dtype=F32)
            gidx = topk_idx(gs, tg)
            gmask = np.zeros((T, ng), dtype=bool)
            np.put_along_axis(gmask, gidx, True, axis=-1)
            smask = np.repeat(gmask, E // ng, axis=-1)
            tmp = np.where(smask, choice, F32(self.noaux_fill)).astype(F32)
            idx = topk_idx(tmp, k)
            wts = np.take_along_axis(scores, idx, axis=-1)
        else:
            raise RefError("unsupported topk_method %r" % method)
        rsf = F32(c.get("routed_scaling_factor", 1.0))
        norm = k > 1 and c.get("norm_topk_prob", False)
        if self.norm_rule == "v2":
            if norm:
                wts = wts / (wts.sum(axis=-1, keepdims=True, dtype=F32) + F32(1e-20))
            else:
                wts = wts * rsf
        else:
            if norm:
                wts = wts / (wts.sum(axis=-1, keepdims=True, dtype=F32) + F32(1e-20))
            wts = wts * rsf
        return idx, wts.astype(F32)

    def moe(self, x, p):
        c = self.cfg
        idx, wts = self.route(x, p)
        mi = c["moe_intermediate_size"]
        y = np.zeros_like(x, dtype=F32)
        for e in np.unique(idx):
            rows, slot = np.nonzero(idx == e)
            out = self.mlp(x[rows], "%s.experts.%d" % (p, e), mi)
            np.add.at(y, rows, out * wts[rows, slot][:, None])
        if c.get("n_shared_experts") is not None:
            y = y + self.mlp(x, p + ".shared_experts", mi * c["n_shared_experts"])
        return y.astype(F32)

    def is_moe(self, i):
        c = self.cfg
        return (c.get("n_routed_experts") is not None
                and i >= c.get("first_k_dense_replace", 0)
                and i % c.get("moe_layer_freq", 1) == 0)

    def logits(self, ids):
        """Float32 logits [len(ids), vocab] for every position."""
        c = self.cfg
        H, V = c["hidden_size"], c["vocab_size"]
        eps = c.get("rms_norm_eps", 1e-6)
        emb = self.w("model.embed_tokens.weight", (V, H))
        x = emb[np.asarray(ids)].astype(F32)
        cos, sin = rope_cos_sin(c, len(ids))
        for i in range(c["num_hidden_layers"]):
            p = "model.layers.%d" % i
            h = rms_norm(x, self.w(p + ".input_layernorm.weight", (H,)), eps)
            x = (x + self.attention(h, p + ".self_attn", cos, sin)).astype(F32)
            h = rms_norm(x, self.w(p + ".post_attention_layernorm.weight", (H,)), eps)
            if self.is_moe(i):
                x = (x + self.moe(h, p + ".mlp")).astype(F32)
            else:
                x = (x + self.mlp(h, p + ".mlp", c["intermediate_size"])).astype(F32)
        x = rms_norm(x, self.w("model.norm.weight", (H,)), eps)
        if c.get("tie_word_embeddings", False):
            head = emb
        else:
            head = self.w("lm_head.weight", (V, H))
        return (x @ head.T).astype(F32)


def log_softmax(row):
    r = row.astype(np.float64)
    m = r.max()
    return r - (m + math.log(np.exp(r - m).sum()))


def position(pos, token, lp, k):
    top = {}
    if k > 0:
        order = np.argsort(-lp, kind="stable")[:k]
        top = {str(int(t)): float(lp[t]) for t in order}
    return {"position": pos, "token_id": int(token), "logprob": float(lp[token]), "top_logprobs": top}


def generate(m, prompt, max_tokens, k, echo, ignore_eos):
    V = m.cfg["vocab_size"]
    for t in prompt:
        if t < 0 or t >= V:
            raise RefError("--prompt-ids: token %d is outside the vocabulary [0, %d)" % (t, V))
    seq = list(prompt)
    out = {"prompt_token_ids": list(prompt), "token_ids": [], "finish_reason": "length", "logprobs": []}
    t0 = time.time()
    prefill_s = decode_s = 0.0
    for step in range(max_tokens):
        lg = m.logits(seq)
        if step == 0:
            prefill_s = time.time() - t0
            if echo:
                out["logprobs"].append({"position": 0, "token_id": int(prompt[0]), "logprob": None,
                                        "top_logprobs": None})
                for p in range(1, len(prompt)):
                    out["logprobs"].append(position(p, prompt[p], log_softmax(lg[p - 1]), k))
        lp = log_softmax(lg[-1])
        tok = int(np.argmax(lg[-1]))
        out["logprobs"].append(position(len(seq), tok, lp, k))
        out["token_ids"].append(tok)
        seq.append(tok)
        if not ignore_eos and tok in m.eos:
            out["finish_reason"] = "stop"
            break
    if max_tokens <= 0 and echo:
        lg = m.logits(seq)
        out["logprobs"].append({"position": 0, "token_id": int(prompt[0]), "logprob": None, "top_logprobs": None})
        for p in range(1, len(prompt)):
            out["logprobs"].append(position(p, prompt[p], log_softmax(lg[p - 1]), k))
    decode_s = time.time() - t0 - prefill_s
    out["prefill_tokens_per_s"] = len(prompt) / prefill_s if prefill_s > 0 else 0.0
    n = len(out["token_ids"]) - 1
    out["decode_tokens_per_s"] = n / decode_s if n > 0 and decode_s > 0 else 0.0
    return out


def parse_ids(s):
    try:
        ids = [int(x) for x in s.split(",") if x.strip() != ""]
    except ValueError:
        raise RefError("--prompt-ids: %r is not a comma-separated list of integers" % s)
    if not ids:
        raise RefError("--prompt-ids: at least one token id is required")
    return ids


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory in HF layout")
    ap.add_argument("--prompt-ids", required=True, help="prompt token ids, comma separated")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--logprobs", type=int, default=0, help="top K logprobs per position")
    ap.add_argument("--echo", action="store_true", help="also report the prompt positions")
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--noaux-mask-fill", choices=["0", "-inf"], default="0",
                    help="value noaux_tc gives experts of non-selected groups")
    ap.add_argument("--no-cache", action="store_true",
                    help="re-read weights on every use instead of keeping float32 copies (big checkpoints)")
    ap.add_argument("--norm-rule", choices=["auto", "v2", "v3"], default="auto",
                    help="routing weight rule: v2 normalise-or-scale, v3 normalise-then-scale")
    a = ap.parse_args(argv)
    try:
        ids = parse_ids(a.prompt_ids)
        if a.logprobs < 0:
            raise RefError("--logprobs must be >= 0")
        m = Model(a.model, noaux_fill=0.0 if a.noaux_mask_fill == "0" else -np.inf, norm_rule=a.norm_rule)
        m.st.keep = not a.no_cache
        out = generate(m, ids, a.max_tokens, a.logprobs, a.echo, a.ignore_eos)
    except RefError as e:
        sys.stderr.write("hfref: %s\n" % e)
        return 2
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
