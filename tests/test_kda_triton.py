"""KDA Triton kernels (chunked forward/backward, recurrent decode) under Triton's interpreter on CPU.

fp32, and fp16 for the low-precision code path (the interpreter's bf16 dots are broken), at tiny shapes
(it is slow). The float64 plain-torch references are the ground truth; the GPU suite
(tests/test_kda_gpu.py) covers bf16 and long sequences. One test compiles the chunk kernels for sm_90
without running them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close_rel

from kimi_hf.kernels.kda import chunk_bwd, chunk_fwd, chunk_kda, fused_recurrent_kda

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a CUDA GPU or Triton's interpreter (TRITON_INTERPRET=1)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(T, N, H=2, K=16, V=16, B=1, seed=0, raw_gate=False):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
    g = rand(B, T, H, K) * 2 if raw_gate else -3 * torch.rand(B, T, H, K, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    return dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=rand(N, H, K, V))


def _run(op, backend, inputs, params, dtype, grads=None, **options):
    """Run ``op`` on copies of ``inputs`` (q, k, v, beta cast to ``dtype``; the gate and the state stay
    fp32 unless ``dtype`` is fp64); return outputs and input gradients."""
    cast = lambda n: dtype if n in ("q", "k", "v", "beta") or dtype == torch.float64 else torch.float32  # noqa: E731
    leaves = {
        n: x.detach().to(DEVICE, cast(n)).clone().requires_grad_(grads is not None)
        for n, x in {**inputs, **params}.items()
    }
    o, s = op(**leaves, output_final_state=True, backend=backend, **options)
    if grads is None:
        return o, s, {}
    do, ds = grads
    ((o * do.to(o)).sum() + (s * ds.to(s)).sum()).backward()
    return o, s, {n: x.grad for n, x in leaves.items()}


def _check(inputs, params=None, backward=True, rtol=2e-5, dtype=torch.float32, **options):
    params = params or {}
    # Both sides see the same rounded q, k, v, beta: only the kernels' own error is measured.
    inputs = {n: x.to(dtype).float() if n in ("q", "k", "v", "beta") else x for n, x in inputs.items()}
    grads = None
    if backward:
        gen = torch.Generator().manual_seed(1)
        N, H, K, V = inputs["initial_state"].shape
        grads = (torch.randn(*inputs["v"].shape, generator=gen), torch.randn(N, H, K, V, generator=gen))
    o, s, d = _run(chunk_kda, "triton", inputs, params, dtype, grads, **options)
    o_ref, s_ref, d_ref = _run(chunk_kda, "torch", inputs, params, torch.float64, grads, **options)
    assert_close_rel(o, o_ref, rtol, "o")
    assert_close_rel(s, s_ref, rtol, "final state")
    for name in d_ref:
        assert_close_rel(d[name], d_ref[name], 10 * rtol, f"d{name}")


def test_chunk_layout_of_equal_lengths_matches_packed_and_reads_no_device_value(monkeypatch):
    """Equal-length batches are laid out from B and T alone (no host synchronisation: no ``.item()``/``.tolist()``),
    and the layout is the one packed sequences of the same lengths get."""
    from kimi_hf.kernels.kda.chunk import _chunks

    def no_read(*args, **kwargs):
        raise AssertionError("the equal-length layout read a device value")

    B, T = 3, 130
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", no_read)
        m.setattr(torch.Tensor, "tolist", no_read)
        equal = _chunks(None, B, T, torch.device("cpu"))
    packed = _chunks(torch.arange(B + 1) * T, 1, B * T, torch.device("cpu"))
    for name in ("cu_seqlens", "indices", "offsets"):
        assert torch.equal(getattr(equal, name), getattr(packed, name)), name
    assert (equal.num_chunks, equal.num_seqs) == (packed.num_chunks, packed.num_seqs) == (9, 3)
    ragged = _chunks(torch.tensor([0, 1, 64, 65, 300]), 1, 300, torch.device("cpu"))
    assert ragged.indices.tolist() == [[0, 0], [1, 0], [2, 0], [3, 0], [3, 1], [3, 2], [3, 3]]
    assert ragged.offsets.tolist() == [0, 1, 2, 3, 7]
    assert _chunks(None, B, T, torch.device("cpu")) is equal, "the equal-length layout built again"
    assert _chunks(None, B, T + 1, torch.device("cpu")) is not equal


@pytest.mark.parametrize("state_block_v", [0, 16], ids=["auto-state-tile", "16-column-state-tile"])
def test_chunk_two_chunks_fwd_bwd(state_block_v, monkeypatch):
    """T = 70: one full chunk and a partial one, with initial state and final-state gradient; V = 48, so that the
    state passes take two value tiles at their automatic width (32) and three at 16 columns (``STATE_BLOCK_V``)."""
    from kimi_hf.kernels.kda import chunk

    monkeypatch.setattr(chunk, "STATE_BLOCK_V", state_block_v)
    _check(_inputs(T=70, N=1, V=48), use_qk_l2norm_in_kernel=True)


def test_chunk_without_in_kernel_l2norm_fwd_bwd():
    """q, k normalised by the caller: dq, dk leave the kernels in the inputs' dtype, not through the norm."""
    inputs = _inputs(T=70, N=1, K=32, V=16, seed=11)
    for name in ("q", "k"):
        inputs[name] = inputs[name] / inputs[name].norm(dim=-1, keepdim=True)
    _check(inputs, use_qk_l2norm_in_kernel=False)


def test_chunk_fp16_fwd_bwd():
    """The low-precision variant (fp16 operands in the tensor-core dots, fp32 accumulation)."""
    _check(_inputs(T=100, N=1, K=32, V=32, seed=8), rtol=3e-3, dtype=torch.float16, use_qk_l2norm_in_kernel=True)


def test_chunk_varlen_fused_gate_fwd_bwd():
    """Ragged packed sequences (lengths 17, 0, 1, 50), K != V, gate and L2 norm fused, dA_log / ddt_bias."""
    cu = torch.tensor([0, 17, 17, 18, 68], dtype=torch.int32)
    gen = torch.Generator().manual_seed(2)
    params = dict(A_log=torch.randn(1, 1, 2, 1, generator=gen), dt_bias=torch.randn(2 * 32, generator=gen))
    _check(
        _inputs(T=68, N=4, K=32, V=16, seed=3, raw_gate=True), params, cu_seqlens=cu.to(DEVICE),
        use_gate_in_kernel=True, use_qk_l2norm_in_kernel=True,
    )  # fmt: skip


@pytest.mark.parametrize("lengths", [[17, 0, 1, 50], [130, 64, 3]], ids=["ragged", "multi-chunk"])
def test_chunk_ragged_sub_blocks(lengths):
    """Packed sequences that end inside a sub-block, or before it: the key backward's partner sub-blocks past the
    end and its pivots clamped to the last valid row, against the reference."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    _check(_inputs(T=int(cu[-1]), N=len(lengths), K=32, V=16, seed=5), {}, cu_seqlens=cu.to(DEVICE))


@pytest.mark.parametrize("lengths", [[17, 0, 1, 50], [130, 64, 3]], ids=["ragged", "multi-chunk"])
def test_chunk_solve_blocks(lengths, monkeypatch):
    """W/U's work (in the chunk dots kernel by default) with W, qg, kh over two key blocks and U over two value blocks
    (V wider than one), against the reference."""
    from kimi_hf.kernels.kda import chunk

    monkeypatch.setattr(chunk, "WU_KEY_BLOCK", 16)  # two key blocks at K = 32
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    _check(_inputs(T=int(cu[-1]), N=len(lengths), K=32, V=80, seed=6), {}, cu_seqlens=cu.to(DEVICE))


@pytest.mark.parametrize("lengths", [[17, 0, 1, 50], [130, 64, 3]], ids=["ragged", "multi-chunk"])
def test_chunk_pairs_key_blocks(lengths, monkeypatch):
    """The pairs between sub-blocks over two key blocks, with sequences ending inside and before a sub-block,
    against the reference (every chunk on the flagged kernel)."""
    from kimi_hf.kernels.kda import chunk

    monkeypatch.setattr(chunk, "PAIRS_KEY_BLOCK", 16)  # two key blocks at K = 32
    monkeypatch.setattr(chunk, "CHUNK_DOT_SPAN", -1.0)  # every chunk on the flagged kernel
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    _check(_inputs(T=int(cu[-1]), N=len(lengths), K=32, V=16, seed=7), {}, cu_seqlens=cu.to(DEVICE))


def test_inverse_kernel_against_float64():
    """The inverse kernel alone, M = (I + Diag(beta) P)^-1 per chunk, against float64 on P's strictly lower entries
    drawn from U(-1, 1) and beta from U(0.5, 1): large enough that every power of the diagonal blocks' strictly
    lower parts up to the 15th shows in M (in the model's inputs the high powers are far below fp32's resolution,
    so the end-to-end tests cannot tell whether they are summed). T = 100: a full chunk and a partial one."""
    from kimi_hf.kernels.kda.chunk import CHUNK, SUB, _chunks

    T, H = 100, 2
    gen = torch.Generator().manual_seed(20)
    P = torch.rand(T, H, CHUNK, generator=gen, dtype=torch.float64) * 2 - 1
    beta = 0.5 + 0.5 * torch.rand(T, H, generator=gen, dtype=torch.float64)
    within = torch.arange(T) % CHUNK
    P = torch.where(torch.arange(CHUNK)[None, None, :] < within[:, None, None], P, 0.0)  # strictly lower per chunk
    chunks = _chunks(None, 1, T, torch.device(DEVICE))
    M = torch.zeros(T, H, CHUNK, device=DEVICE)
    chunk_fwd.kda_inverse_fwd_kernel[(chunks.num_chunks, H)](
        P.float().to(DEVICE), beta.float().to(DEVICE), M, chunks.indices, chunks.cu_seqlens, H,
        BT=CHUNK, BC=SUB, IEEE="ieee", num_warps=2,
    )  # fmt: skip
    for start in range(0, T, CHUNK):
        n = min(CHUNK, T - start)
        for h in range(H):
            L = torch.eye(n, dtype=torch.float64) + beta[start : start + n, h, None] * P[start : start + n, h, :n]
            assert_close_rel(M[start : start + n, h, :n], torch.linalg.inv(L), 1e-5, f"M of chunk {start}, head {h}")
            assert torch.all(M[start : start + n, h, n:] == 0), "M above the diagonal past the sequence end"


def _chunk_pairs_float64(q, k, g, start, n, scale):
    """A_qk and P of the chunk of rows ``start .. start + n`` of ``[T, H, K]`` inputs in float64, ``[n, H, n]``:
    A_qk[i, j] = scale sum_d q_id k_jd exp(G_id - G_jd) for j <= i, P[i, j] the same with k_i for j < i."""
    q, k = q[start : start + n].double(), k[start : start + n].double()
    G = g[start : start + n].double().cumsum(0)
    decay = torch.exp(G[:, None] - G[None, :])  # [i, j, H, K]
    on = torch.tril(torch.ones(n, n, dtype=torch.bool))[:, :, None]
    below = on & ~torch.eye(n, dtype=torch.bool)[:, :, None]
    A = torch.where(on, scale * torch.einsum("ihd,jhd,ijhd->ijh", q, k, decay), 0.0)
    P = torch.where(below, torch.einsum("ihd,jhd,ijhd->ijh", k, k, decay), 0.0)
    return A.permute(0, 2, 1), P.permute(0, 2, 1)


@pytest.mark.parametrize(
    "key_block, inverse, save",
    [(32, False, False), (16, True, False), (16, True, True)],
    ids=["one-key-block", "two-key-blocks-and-inverse", "two-key-blocks-inverse-for-backward"],
)
def test_chunk_dots_kernel_against_float64(key_block, inverse, save):
    """The chunk dots kernel alone, against float64, on three chunks of one sequence (T = 150: the last ends inside
    its first half's sub-blocks) with decays of up to -3 per token, and the middle chunk's decays 30 times stronger
    in one channel: the mild chunks are computed (every entry of A_qk, zeros above the diagonal; with ``inverse``
    also M = (I + Diag(beta) P)^-1; P where it is read: without ``inverse``, by the inverse kernel, or with ``save``,
    by the backward) and not flagged, the strong one flagged and left unwritten."""
    from kimi_hf.kernels.kda.chunk import CHUNK, CHUNK_DOT_SPAN, _chunks

    T, H, K, scale = 150, 2, 32, 0.3
    gen = torch.Generator().manual_seed(22)
    q, k = torch.randn(T, H, K, generator=gen), torch.randn(T, H, K, generator=gen)
    beta = torch.rand(T, H, generator=gen)
    g = -3 * torch.rand(T, H, K, generator=gen)
    g[CHUNK : 2 * CHUNK, 1, 5] *= 30
    G = torch.cat([g[s : s + CHUNK].cumsum(0) for s in range(0, T, CHUNK)])
    chunks = _chunks(None, 1, T, torch.device(DEVICE))
    A_qk, P, M = (torch.full((T, H, CHUNK), float("nan"), device=DEVICE) for _ in range(3))
    exact = torch.full((chunks.num_chunks, H), -1, device=DEVICE, dtype=torch.int32)
    chunk_fwd.kda_chunk_dots_fwd_kernel[(chunks.num_chunks * H,)](
        q.to(DEVICE), k.to(DEVICE), None, G.to(DEVICE), beta.to(DEVICE), A_qk, P, M, None, None, None, None, None,
        None, None, exact, chunks.indices, chunks.cu_seqlens, scale, H, K, 0,
        BT=CHUNK, BK=key_block, SPAN=CHUNK_DOT_SPAN, INVERSE=inverse, WU=False, BK_WU=16, BV=16, IEEE="ieee",
        NORMS=False, EPS=0.0, ROW_LIMIT=0.0, SAVE=save, num_warps=4,
    )  # fmt: skip
    assert exact.tolist() == [[0, 0], [0, 1], [0, 0]]
    for c, start in enumerate(range(0, T, CHUNK)):
        n = min(CHUNK, T - start)
        A_ref, P_ref = _chunk_pairs_float64(q, k, g, start, n, scale)
        for h in range(H):
            rows = slice(start, start + n)
            if exact[c, h]:
                for name, x in (("A_qk", A_qk), ("P", P), ("M", M)):
                    assert torch.isnan(x[rows, h]).all(), f"{name} of the flagged chunk {c} written"
                continue
            assert_close_rel(A_qk[rows, h, :n], A_ref[:, h], 1e-5, f"A_qk of chunk {c}, head {h}")
            assert torch.all(A_qk[rows, h, n:] == 0), "A_qk past the sequence end"
            if save or not inverse:
                assert_close_rel(P[rows, h, :n], P_ref[:, h], 1e-5, f"P of chunk {c}, head {h}")
                assert torch.all(P[rows, h, n:] == 0), "P past the sequence end"
            else:
                assert torch.isnan(P[rows, h]).all(), "P stored for an inference forward that computes M"
            if inverse:
                L = torch.eye(n, dtype=torch.float64) + beta[rows, h, None].double() * P_ref[:, h]
                assert_close_rel(M[rows, h, :n], torch.linalg.inv(L), 1e-5, f"M of chunk {c}, head {h}")
                assert torch.all(M[rows, h, n:] == 0), "M past the sequence end"
            else:
                assert torch.isnan(M[rows, h]).all(), "M written without INVERSE"


@pytest.mark.parametrize("save", [False, True], ids=["inference", "for-backward"])
def test_chunk_dots_kernel_normalising_q_and_k(save):
    """The chunk dots kernel taking the L2 norms of the raw q, k (``NORMS``) and doing W/U's work, against float64, on
    three chunks of one sequence (T = 150): the middle chunk's decays 30 times stronger in one channel of head 1
    (flagged by the span), the last chunk's q rows 1e15 times larger in head 0 (flagged by ``ROW_LIMIT``: squared
    norms ~3e31). The computed chunks' A_qk, W, U, qg, kh and gl (and with ``SAVE`` P and M; without, neither is
    stored) are those of the normalised q, k; qn and kn are stored for the flagged chunks and, with ``SAVE``, for
    all."""
    from kimi_hf.kernels.kda.chunk import CHUNK, CHUNK_DOT_SPAN, _chunks, _row_limit

    T, H, K, V, scale, eps = 150, 2, 32, 16, 0.3, 1e-6
    gen = torch.Generator().manual_seed(29)
    q, k = torch.randn(T, H, K, generator=gen), torch.randn(T, H, K, generator=gen)
    q[2 * CHUNK : 2 * CHUNK + 5, 0] *= 1e15
    v, beta = torch.randn(T, H, V, generator=gen), torch.rand(T, H, generator=gen)
    g = -3 * torch.rand(T, H, K, generator=gen)
    g[CHUNK : 2 * CHUNK, 1, 5] *= 30
    G = torch.cat([g[s : s + CHUNK].cumsum(0) for s in range(0, T, CHUNK)])
    chunks = _chunks(None, 1, T, torch.device(DEVICE))
    nan = lambda *shape: torch.full(shape, float("nan"), device=DEVICE)  # noqa: E731
    A_qk, P, M = nan(T, H, CHUNK), nan(T, H, CHUNK), nan(T, H, CHUNK)
    W, qg, kh, qn, kn = (nan(T, H, K) for _ in range(5))
    U, gl = nan(T, H, V), nan(3, H, K)
    exact = torch.full((chunks.num_chunks, H), -1, device=DEVICE, dtype=torch.int32)
    chunk_fwd.kda_chunk_dots_fwd_kernel[(chunks.num_chunks * H,)](
        q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), G.to(DEVICE), beta.to(DEVICE), A_qk, P, M, W, U, qg, kh, gl, qn,
        kn, exact, chunks.indices, chunks.cu_seqlens, scale, H, K, V,
        BT=CHUNK, BK=16, SPAN=CHUNK_DOT_SPAN, INVERSE=True, WU=True, BK_WU=16, BV=16, IEEE="ieee",
        NORMS=True, EPS=eps, ROW_LIMIT=_row_limit(), SAVE=save, num_warps=4,
    )  # fmt: skip
    assert exact.tolist() == [[0, 0], [0, 1], [1, 0]]
    normed = lambda x: x.double() / (x.double().pow(2).sum(-1, keepdim=True) + eps).sqrt()  # noqa: E731
    qn_ref, kn_ref = normed(q), normed(k)
    for c, start in enumerate(range(0, T, CHUNK)):
        n = min(CHUNK, T - start)
        A_ref, P_ref = _chunk_pairs_float64(qn_ref, kn_ref, g, start, n, scale)
        rows = slice(start, start + n)
        for h in range(H):
            for name, x, ref in (("qn", qn, qn_ref[rows, h]), ("kn", kn, kn_ref[rows, h])):
                if save or exact[c, h]:
                    assert_close_rel(x[rows, h], ref, 1e-5, f"{name} of chunk {c}, head {h}")
                else:
                    assert torch.isnan(x[rows, h]).all(), f"{name} of the computed chunk {c} stored without SAVE"
            if exact[c, h]:
                assert torch.isnan(A_qk[rows, h]).all(), f"A_qk of the flagged chunk {c} written"
                continue
            assert_close_rel(A_qk[rows, h, :n], A_ref[:, h], 1e-5, f"A_qk of chunk {c}, head {h}")
            b = beta[rows, h, None].double()
            M_ref = torch.linalg.inv(torch.eye(n, dtype=torch.float64) + b * P_ref[:, h])
            if save:
                assert_close_rel(P[rows, h, :n], P_ref[:, h], 1e-5, f"P of chunk {c}, head {h}")
                assert_close_rel(M[rows, h, :n], M_ref, 1e-5, f"M of chunk {c}, head {h}")
            else:
                for name, x in (("P", P), ("M", M)):
                    assert torch.isnan(x[rows, h]).all(), f"{name} of chunk {c} stored for an inference forward"
            Gc = G[rows, h].double()
            expected = dict(
                W=M_ref @ (b * kn_ref[rows, h] * Gc.exp()), U=M_ref @ (b * v[rows, h].double()),
                qg=scale * qn_ref[rows, h] * Gc.exp(), kh=kn_ref[rows, h] * (Gc[-1] - Gc).exp(),
            )  # fmt: skip
            for name, x in (("W", W), ("U", U), ("qg", qg), ("kh", kh)):
                assert_close_rel(x[rows, h], expected[name], 1e-5, f"{name} of chunk {c}, head {h}")
            assert_close_rel(gl[c, h], Gc[-1].exp(), 1e-6, f"gl of chunk {c}, head {h}")


@pytest.mark.parametrize("fuse", [1, 2, 3], ids=["inverse", "inverse-and-wu", "norms-inverse-and-wu"])
def test_chunk_forward_with_more_work_in_the_chunk_dots_kernel(fuse, monkeypatch):
    """CHUNK_DOTS_FUSE 1 (2): the chunk dots kernel stores M (and W, U, qg, kh, gl) of the chunks it computes and the
    flagged kernel the flagged chunks' (at 1 the W/U kernel then takes every chunk); 3: it also takes the L2 norms of
    q, k. One chunk of three flagged (strong decays in it), W/U's work over two key and two value blocks: the inference
    forward (at 3 qn, kn then stored for the flagged chunk only) and forward and backward against the reference."""
    from kimi_hf.kernels.kda import chunk

    monkeypatch.setattr(chunk, "CHUNK_DOTS_FUSE", fuse)
    monkeypatch.setattr(chunk, "CHUNK_DOTS_MAXNREG", 168)  # (a launch option; the interpreter runs it unchanged)
    monkeypatch.setattr(chunk, "WU_KEY_BLOCK", 16)
    inputs = _inputs(T=150, N=1, K=32, V=80, seed=24)
    inputs["g"][:, 70:90] *= 20 / 3
    _check(inputs, backward=False, use_qk_l2norm_in_kernel=True)
    _check(inputs, use_qk_l2norm_in_kernel=True)


@pytest.mark.parametrize("case", ["fused-gate-ragged", "large-rows"])
def test_chunk_forward_with_the_norms_in_the_chunk_dots_kernel(case, monkeypatch):
    """CHUNK_DOTS_FUSE 3 (the chunk dots kernel takes the L2 norms of q, k), inference forward and forward and
    backward against the reference: ragged sequences with the fused gate, key channels in two blocks in both of the
    kernel's phases; and rows of q too large to sum unnormalised (entries of 1e12, squared norms ~3e25 past
    ``_row_limit()``): their chunk is flagged and normalised first. (Without the L2 norm, level 3 is level 2:
    test_chunk_cases' caller-normalised case.)"""
    from kimi_hf.kernels.kda import chunk

    monkeypatch.setattr(chunk, "CHUNK_DOTS_FUSE", 3)
    if case == "fused-gate-ragged":
        monkeypatch.setattr(chunk, "CHUNK_DOTS_KEY_BLOCK", 16)
        monkeypatch.setattr(chunk, "WU_KEY_BLOCK", 16)
        gen = torch.Generator().manual_seed(25)
        params = dict(A_log=torch.randn(2, generator=gen), dt_bias=torch.randn(2 * 32, generator=gen))
        cu = torch.tensor([0, 17, 17, 18, 68, 200], dtype=torch.int32)
        inputs = _inputs(T=200, N=5, K=32, V=16, seed=26, raw_gate=True)
        options = dict(cu_seqlens=cu.to(DEVICE), use_gate_in_kernel=True, use_qk_l2norm_in_kernel=True)
    else:
        params = {}
        inputs = _inputs(T=130, N=1, K=32, V=16, seed=28)
        inputs["q"][:, 70:80] *= 1e12
        assert (inputs["q"][:, 70:80] ** 2).sum(-1).min() > chunk._row_limit()
        options = dict(use_qk_l2norm_in_kernel=True)
    _check(inputs, params, backward=False, **options)
    _check(inputs, params, **options)


def test_flagged_block_is_checked(monkeypatch):
    from kimi_hf.kernels.kda import chunk

    monkeypatch.setattr(chunk, "FLAGGED_BLOCK", 12)
    inputs = _inputs(T=8, N=1)
    with pytest.raises(ValueError, match="FLAGGED_BLOCK must be a power of two, got 12"):
        chunk_kda(**{n: x.to(DEVICE) for n, x in inputs.items()}, backend="triton")


def test_chunk_dots_fuse_level_is_checked(monkeypatch):
    from kimi_hf.kernels.kda import chunk

    monkeypatch.setattr(chunk, "CHUNK_DOTS_FUSE", 4)
    inputs = _inputs(T=8, N=1)
    with pytest.raises(ValueError, match="CHUNK_DOTS_FUSE must be 0, 1, 2 or 3, got 4"):
        chunk_kda(**{n: x.to(DEVICE) for n, x in inputs.items()}, backend="triton")


@pytest.mark.parametrize(
    "fuse", [1, 2, 3], ids=["inverse-flagged-wu-kernel", "normalised-by-prep", "normalised-by-chunk-dots"]
)
def test_chunk_forward_with_every_chunk_on_the_flagged_kernel(fuse, monkeypatch):
    """CHUNK_DOT_SPAN = -1 flags every chunk, so the flagged kernel computes all of A_qk and P (with mild decays it
    computes no chunk) inside the sub-blocks and between them, each over two key blocks, and M (at CHUNK_DOTS_FUSE 1
    the W/U kernel then takes every chunk; above, the flagged kernel does W/U's work too): forward and backward
    against the reference, ragged sequences; at CHUNK_DOTS_FUSE 3 from the qn, kn that the chunk dots kernel stores
    for flagged chunks. Its programs take ``FLAGGED_BLOCK`` = 8 of the twelve (chunk, head) items each, the last
    program four."""
    from kimi_hf.kernels.kda import chunk

    monkeypatch.setattr(chunk, "CHUNK_DOT_SPAN", -1.0)
    monkeypatch.setattr(chunk, "FLAGGED_BLOCK", 8)
    monkeypatch.setattr(chunk, "CHUNK_DOTS_FUSE", fuse)
    monkeypatch.setattr(chunk, "DIAG_DOTS_KEY_BLOCK", 16)
    monkeypatch.setattr(chunk, "PAIRS_KEY_BLOCK", 16)
    cu = torch.tensor([0, 17, 17, 18, 68, 200], dtype=torch.int32)
    _check(_inputs(T=200, N=5, K=32, V=16, seed=23), cu_seqlens=cu.to(DEVICE), use_qk_l2norm_in_kernel=True)


@pytest.mark.parametrize(
    "case",
    ["fused-gate-ragged", "two-blocks", "caller-normalised", "fp16", "strong-decay", "mixed-decay", "head-dim-48"],
)
def test_chunk_cases(case, monkeypatch):
    """Forward and backward against the float64 reference on: ragged packed sequences with the fused gate, two key
    blocks in every per-chunk kernel and two value blocks in W/U, q/k normalised by the caller, the fp16 path, decays
    far below fp32's range (every sub-block on the exact diagonal paths of the forward's flagged kernel and the
    backward's key kernel, sequences ending inside a sub-block), strong in part of a chunk (both diagonal paths in one
    program), and K = 48 (norms over a padded 64-channel tile)."""
    from kimi_hf.kernels.kda import chunk

    gen = torch.Generator().manual_seed(12)
    if case == "fused-gate-ragged":
        cu = torch.tensor([0, 17, 17, 18, 68, 200], dtype=torch.int32)
        params = dict(A_log=torch.randn(2, generator=gen), dt_bias=torch.randn(2 * 32, generator=gen))
        _check(_inputs(T=200, N=5, K=32, V=16, seed=13, raw_gate=True), params, cu_seqlens=cu.to(DEVICE),
               use_gate_in_kernel=True, use_qk_l2norm_in_kernel=True)  # fmt: skip
    elif case == "two-blocks":  # every per-chunk kernel's key channels in two blocks at K = 32, W/U's values at V = 80
        for name in ("CHUNK_DOTS_KEY_BLOCK", "DIAG_DOTS_KEY_BLOCK", "PAIRS_KEY_BLOCK", "BWD_KEY_BLOCK", "WU_KEY_BLOCK"):
            monkeypatch.setattr(chunk, name, 16)
        cu = torch.tensor([0, 130, 194, 197], dtype=torch.int32)
        _check(_inputs(T=197, N=3, K=32, V=80, seed=14), cu_seqlens=cu.to(DEVICE), use_qk_l2norm_in_kernel=True)
    elif case == "caller-normalised":
        inputs = _inputs(T=70, N=1, K=32, V=16, seed=15)
        for name in ("q", "k"):
            inputs[name] = inputs[name] / inputs[name].norm(dim=-1, keepdim=True)
        _check(inputs, use_qk_l2norm_in_kernel=False)
    elif case == "fp16":
        _check(_inputs(T=100, N=1, K=32, V=32, seed=16), rtol=3e-3, dtype=torch.float16, use_qk_l2norm_in_kernel=True)
    elif case == "strong-decay":
        inputs = _inputs(T=90, N=1, seed=17)
        inputs["g"] = inputs["g"] * (20 / 3)
        _check(inputs, use_qk_l2norm_in_kernel=True)
    elif case == "mixed-decay":  # sub-blocks 1 and 2 of the first chunk past the span, the others within it
        inputs = _inputs(T=130, N=1, seed=19)
        inputs["g"][:, 20:40] *= 20 / 3
        _check(inputs, use_qk_l2norm_in_kernel=True)
    else:
        params = dict(A_log=torch.randn(2, generator=gen), dt_bias=torch.randn(2, 48, generator=gen))
        _check(_inputs(T=70, N=1, K=48, V=16, seed=18, raw_gate=True), params, use_gate_in_kernel=True,
               use_qk_l2norm_in_kernel=True)  # fmt: skip


def test_chunk_head_groups():
    """H = 5, an odd head count (until session 20 the forward's diagonal kernel took heads in pairs)."""
    _check(_inputs(T=37, N=1, H=5, seed=11), {})


def test_chunk_key_blocks_fwd_bwd():
    """K = 96: the backward splits key channels into blocks of 64 (the second one partial)."""
    gen = torch.Generator().manual_seed(9)
    params = dict(A_log=torch.randn(2, generator=gen), dt_bias=torch.randn(2, 96, generator=gen))
    _check(_inputs(T=70, N=1, K=96, V=32, seed=10, raw_gate=True), params, use_gate_in_kernel=True,
           use_qk_l2norm_in_kernel=True)  # fmt: skip


def test_chunk_single_token_batch_and_strong_decay_forward():
    """T = 1 with B = 2, and g ~ -U(0, 20) (exp(G) of a chunk far below fp32's range) stays exact."""
    _check(_inputs(T=1, N=2, B=2, seed=4), backward=False)
    inputs = _inputs(T=40, N=1, seed=5)
    inputs["g"] = inputs["g"] * (20 / 3)
    _check(inputs, backward=False, use_qk_l2norm_in_kernel=True)


def test_fused_recurrent_decode_matches_reference():
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)
    gen = torch.Generator().manual_seed(6)
    params = dict(A_log=torch.randn(2, generator=gen), dt_bias=torch.randn(2, 16, generator=gen))
    inputs = _inputs(T=3, N=2, seed=7, raw_gate=True)
    options = dict(cu_seqlens=cu.to(DEVICE), use_gate_in_kernel=True, use_qk_l2norm_in_kernel=True)
    o, s, _ = _run(fused_recurrent_kda, "triton", inputs, params, torch.float32, **options)
    o_ref, s_ref, _ = _run(fused_recurrent_kda, "torch", inputs, params, torch.float64, **options)
    assert_close_rel(o, o_ref, 2e-5, "o")
    assert_close_rel(s, s_ref, 2e-5, "final state")
    state = inputs["initial_state"].to(DEVICE).clone()
    leaves = {n: x.to(DEVICE) for n, x in inputs.items() if n != "initial_state"}
    o2, s2 = fused_recurrent_kda(**leaves, **{n: x.to(DEVICE) for n, x in params.items()}, initial_state=state,
                                 inplace_final_state=True, backend="triton", **options)  # fmt: skip
    assert s2 is state
    assert_close_rel(state, s_ref, 2e-5, "state written in place")


def test_strided_cu_seqlens():
    """cu_seqlens as a strided view: the kernels read the offsets at unit stride (they segfaulted or read the wrong
    ones); both ops give the contiguous offsets' answer."""
    strided = torch.tensor([0, 99, 7, 99, 20], dtype=torch.int32).to(DEVICE)[::2]
    inputs = _inputs(T=20, N=2, seed=12)
    for op in (chunk_kda, fused_recurrent_kda):
        o, s, _ = _run(op, "triton", inputs, {}, torch.float32, cu_seqlens=strided)
        o_ref, s_ref, _ = _run(op, "torch", inputs, {}, torch.float64, cu_seqlens=strided.contiguous())
        assert_close_rel(o, o_ref, 2e-5, f"{op.__name__} o")
        assert_close_rel(s, s_ref, 2e-5, f"{op.__name__} final state")


def test_fused_gate_without_dt_bias_is_a_zero_bias():
    """fla's dt_bias is optional with the fused gate: None is no bias, on both ops and both paths (it was refused)."""
    inputs = _inputs(T=20, N=1, seed=13, raw_gate=True)
    A_log = torch.randn(2, generator=torch.Generator().manual_seed(3))
    for op in (chunk_kda, fused_recurrent_kda):
        for backend in ("torch", "triton"):
            got = _run(op, backend, inputs, {"A_log": A_log}, torch.float32, use_gate_in_kernel=True)
            zero = _run(op, backend, inputs, {"A_log": A_log, "dt_bias": torch.zeros(2 * 16)}, torch.float32,
                        use_gate_in_kernel=True)  # fmt: skip
            assert_close_rel(got[0], zero[0], 0, f"{op.__name__} {backend} o")
            assert_close_rel(got[1], zero[1], 0, f"{op.__name__} {backend} final state")


def test_triton_path_rejects_unsupported_inputs():
    inputs = _inputs(T=2, N=1)
    with pytest.raises(ValueError, match="fp16/bf16/fp32"):
        chunk_kda(**{n: x.double().to(DEVICE) for n, x in inputs.items()}, backend="triton")
    wide = _inputs(T=2, N=1, K=512, V=16)
    with pytest.raises(ValueError, match="head dims up to 256"):
        chunk_kda(**{n: x.to(DEVICE) for n, x in wide.items()}, backend="triton")


def test_chunk_kernels_compile_for_hopper():
    """Every chunk kernel, at the tiles and warps its launcher uses, compiles for sm_90 with the installed
    triton: a real compilation (the interpreter never generates code, so it misses what only code generation
    refuses). Runs the compile-only register report in a process without TRITON_INTERPRET."""
    script = Path(__file__).resolve().parents[1] / "kernels" / "benchmarks" / "kda_registers.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    if run.returncode != 0 and "no ptxas" in run.stderr:
        pytest.skip("this triton has no bundled ptxas")
    assert run.returncode == 0, run.stderr[-3000:]
    kernels = {name for module in (chunk_fwd, chunk_bwd) for name in dir(module) if name.startswith("kda_")}
    reported = {line.split("|")[1].strip() for line in run.stdout.splitlines() if line.startswith("| kda_")}
    assert reported == kernels, run.stdout


def test_benchmark_byte_table_names_every_forward_kernel(monkeypatch):
    """``bench_kda.forward_bytes`` (the forward's bytes against its GPU time) has one entry for each kernel the
    inference forward launches and no other, so that a kernel added, renamed or removed cannot leave it stale."""
    from kimi_hf.kernels.kda import chunk

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "kernels" / "benchmarks"))
    import bench_kda

    launched = set()

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launched.add(self.kernel.fn.__name__)
            return self.kernel[grid]

    for name in dir(chunk):
        if name.startswith("kda_") and name.endswith("_kernel"):
            monkeypatch.setattr(chunk, name, Recorder(getattr(chunk, name)))
    inputs = _inputs(T=70, N=1, K=32, V=16, seed=21)
    with torch.no_grad():
        chunk_kda(**{n: x.to(DEVICE) for n, x in inputs.items()}, use_qk_l2norm_in_kernel=True, backend="triton")
    assert launched == set(bench_kda.forward_bytes(32, 16))
