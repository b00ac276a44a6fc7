"""Fast path of improved precision/recall: GEMM screening under a per-pair error bound, exact answer.

`metrics.precision_recall` calls `precision_recall` below for all but small inputs. It returns what the
plain definition (`metrics.precision_recall_plain`) returns: squared distances Σ(x − y)² of the
given features in float64, radius² r² = (k+1)-th smallest in the point's own set (itself included
at 0), membership d² ≤ r². The plain definition costs N·M·D float64 subtractions; here every squared
distance comes from a bf16 (or float32) GEMM, ‖x‖² + ‖y‖² − 2x·y, as an interval [lo, hi] proven to
hold the plain value, and only what an interval cannot decide is computed by the plain formula:

1. Operands: x̂ = (x − c)·s in float64 (c = the real mean, s a power of two bringing the largest
   |coordinate| to ≤ 1; P/R are invariant to a common shift and scale), rounded once to the GEMM's
   dtype: w = bf16(x̂) or float32(x̂), coordinates below TINY set to 0. Per point n = ‖x̂‖²,
   δ = x̂ − w, B = ‖δ‖ and Â = √n + 2B ≥ ‖w‖ + B.
2. Per-pair bound (Higham, Accuracy and Stability of Numerical Algorithms, §3.1). The GEMM's g of
   w_x·w_y has float32 sums, error ≤ γ‖w_x‖‖w_y‖ with γ = γ_{D+2}, and a bf16 output adds its
   rounding; x̂_x·x̂_y − w_x·w_y = w_x·δ_y + δ_x·x̂_y ≤ Â_x B_y + B_x Â_y (Cauchy–Schwarz). Hence
       |n_x + n_y − 2g − s²d²| ≤ err = c|g| + Â_x q_y + q_x Â_y + κ(Â_x² + Â_y²),
   q = 2.02 B + (1.01γ + κ)Â, c = C16 for bf16 (0 for float32), κ = KAPPA for the screen's own
   float32 arithmetic, the rounding of n and x̂ and the float64 rounding of the plain formula;
   lo = n_x + n_y − 2g − err, hi = lo + 2err. Only the pair's own norms enter: a far point never
   widens another pair's interval.
3. Radii, as intervals: in the same-set tiles (each computed once, for the rows of both blocks)
   keep, per point, the k+1 smallest lower and the k+1 smallest upper bounds; their largest are
   L ≤ r² ≤ U. The diagonal tiles start the lists; in the others only entries with lo ≤ U enter.
4. Membership: a pair with hi ≤ L of the ball is inside, one with lo > U is not: one dense lo ≤ U
   test per cross tile and direction, upper bounds only where it passes. Open pairs are recomputed
   by the plain formula, each point's most promising pair first; only where that exact d² falls in
   [L, U] is the ball's exact radius needed: its row is screened again and the candidates lo ≤ U
   (every point within r² is one) recomputed exactly, r² = their (k+1)-th smallest.
DESIGN: radii as intervals, made exact only on demand, let the radius pass run in bf16 like the
cross pass (its GEMMs are 2.4× faster than float32 on an AVX512-BF16 CPU); on bench/metrics.py's
sets at N = 10 000 the exact work left is 59 radii and 688 distances (bench/RESULTS.md).
"""
import functools
import math
import time
from collections import namedtuple

import torch

U32, U16 = 2.0 ** -24, 2.0 ** -8   # unit roundoffs of float32 and bfloat16 (24- and 8-bit significands)
C16 = 2 * 2.02 * U16     # a bf16 GEMM output's rounding in d² = … − 2g: 2|g − G| ≤ 2.02·u16·|g| rounding to
                         # nearest, doubled to also cover truncation
KAPPA = 32 * U32         # ≥ 16 float32 roundings of values ≤ 1.1(Â_x + Â_y)² in forming lo and hi
TINY = 2.0 ** -40        # operand coordinates below this (the largest is ≤ 1) are 0: the others are multiples
                         # of 2⁻⁶³, so every product and partial sum is a multiple of 2⁻¹²⁶, never subnormal,
                         # and flush-to-zero hardware (AVX512-BF16, AMX) changes nothing
BLOCK = 2048             # DESIGN: 2048 × 2048 float32 tiles (16 MiB): GEMM-efficient, memory flat in N
BLOCK_CUDA = 8192        # DESIGN: 256 MiB tiles on GPUs, where small tiles would leave the GEMMs launch-bound
PAIR_CHUNK = 1 << 20     # DESIGN: float64 elements per exact recomputation (8 MiB)
ROW_CHUNK = 1 << 19      # DESIGN: float64 elements per block of operands built (4 MiB: stays in cache)
MAX_PENDING = 1 << 22    # DESIGN: open pairs held before they are resolved (≈ 80 MiB)

# GEMM copy w (N, D); Â, q, κÂ² (N,) float32; u, v (N, 4) float32 with u_x·v_y = n_x + n_y − err(g = 0)
Operands = namedtuple("Operands", "w a q k2 u v")
Balls = namedtuple("Balls", "x ops r2_lo r2_hi r2")  # features, operands, L, U (working units), exact r² or NaN
Workspace = namedtuple("Workspace", "g gf lo mask threads")


@functools.cache
def bf16_is_faster(device_type, d):
    """Whether bf16 GEMMs beat float32 ones here: always on GPUs (tensor cores); on CPUs measured
    (DESIGN: it depends on the machine, AVX512-BF16 or AMX, and the oneDNN build), as a (512, d)
    × (d, 512) product ≥ 1.4× faster (bf16 intervals are wider, so more pairs are recomputed)."""
    if device_type != "cpu":
        return device_type == "cuda"
    x = torch.randn(512, d, generator=torch.Generator().manual_seed(0))

    def seconds(t):
        t @ t.T
        start = time.perf_counter()
        for _ in range(2):
            t @ t.T
        return time.perf_counter() - start
    return 1.4 * seconds(x.bfloat16()) < seconds(x)


def exact_sq(a, ia, b, ib):
    """Σ(a[ia] − b[ib])² pair by pair in float64 -> (P,): the plain definition's formula (identical
    points give exactly 0), gathered and computed in chunks of PAIR_CHUNK elements."""
    out = torch.empty(len(ia), dtype=torch.float64, device=a.device)
    step = max(1, PAIR_CHUNK // max(1, a.shape[1]))
    for s in range(0, len(ia), step):
        out[s:s + step] = (a[ia[s:s + step]].double() - b[ib[s:s + step]].double()).square_().sum(-1)
    return out


def operands(x, centre, scale, lowp):
    """Screening operands of x (N, D) (module doc, 2), built ROW_CHUNK elements at a time in float64:
    x̂ = (x − centre)·scale, its GEMM copy w (bf16 if lowp, else float32), Â, q, κÂ², u, v."""
    num, d = x.shape
    w = torch.empty(x.shape, dtype=torch.bfloat16 if lowp else torch.float32, device=x.device)
    n, b = (torch.empty(num, dtype=torch.float64, device=x.device) for _ in range(2))
    rows = max(1, ROW_CHUNK // d)
    xh, wd = (torch.empty(min(rows, num), d, dtype=torch.float64, device=x.device) for _ in range(2))
    for i in range(0, num, rows):
        xi, wi = x[i:i + rows], w[i:i + rows]
        xhi, wdi = xh[:len(xi)].copy_(xi), wd[:len(xi)]
        torch.add(-centre * scale, xhi, alpha=scale, out=xhi)     # (x − centre)·scale, scale a power of two
        n[i:i + rows] = torch.linalg.vector_norm(xhi, dim=1).square_()
        wi.copy_(xhi).masked_fill_(wi.abs() < TINY, 0)
        b[i:i + rows] = torch.linalg.vector_norm(xhi.sub_(wdi.copy_(wi)), dim=1)
    gamma = 1.01 * (d + 2) * U32 / (1 - (d + 2) * U32)
    up = 1 + 2.0 ** -20          # float64 norms rounded to float32: round up
    a_hat = n.sqrt() + 2 * b     # ≥ ‖w‖ + ‖x̂ − w‖ (triangle inequality)
    a_hat, q, k2 = ((t * up).float() for t in (a_hat, 2.02 * b + (gamma + KAPPA) * a_hat, KAPPA * a_hat.square()))
    n, one = n.float() - k2, torch.ones_like(k2)
    return Operands(w, a_hat, q, k2, torch.stack([n, one, a_hat, q], 1), torch.stack([one, n, -q, -a_hat], 1))


def workspace(ops, block, threads):
    """Tile buffers, reused by every tile (fresh ones would page-fault each time): the GEMM's output,
    two float32 tiles and a mask, flat, for tiles of up to block × block; the GEMMs' CPU threads."""
    dev, size = ops.w.device, block * block
    return Workspace(torch.empty(size, dtype=ops.w.dtype, device=dev), torch.empty(size, device=dev),
                     torch.empty(size, device=dev), torch.empty(size, dtype=torch.bool, device=dev), threads)


def lower(x, i, y, j, ws):
    """Lower bounds lo (b, c) of s²·d² between operand rows x[i] and y[j] (index or slice), float32,
    and |g| of their GEMM values g (bf16 operands; float32 ones' bound has no |g| term): views of ws."""
    b, c = len(x.a[i]), len(y.a[j])
    g, gf, lo = (t[:b * c].view(b, c) for t in ws[:3])
    rest = torch.get_num_threads()
    torch.set_num_threads(ws.threads)
    torch.mm(x.w[i], y.w[j].T, out=g)
    torch.set_num_threads(rest)
    gf = gf.copy_(g) if g.dtype == torch.bfloat16 else g          # bf16 values are exact in float32
    torch.addmm(gf, x.u[i], y.v[j].T, beta=-2, out=lo)              # n_x + n_y − 2g − (err without c|g|)
    if g.dtype == torch.bfloat16:
        lo.sub_(gf.abs_(), alpha=C16)
    return lo, gf


def err(absg, x, i, y, j):
    """Half-width err of the interval at pairs (x[i], y[j]) (index tensors), |g| their GEMM values:
    lo + 2·err is the upper bound hi."""
    e = x.a[i] * y.q[j] + x.q[i] * y.a[j] + x.k2[i] + y.k2[j]
    return e + C16 * absg if x.w.dtype == torch.bfloat16 else e


def hits(t, bound, ws, keep=None):
    """(r, c) of the entries of a tile t (b, c) with t ≤ bound (broadcastable), row-major; keep: a
    row (b, 1) or column (1, c) bool mask of where to look."""
    mask = torch.le(t, bound, out=ws.mask[:t.numel()].view(t.shape))
    if keep is not None:
        mask.view(torch.uint8).mul_(keep.view(torch.uint8))
    return mask.nonzero(as_tuple=True)


def _dense(r, v, b):
    """Values v at rows r (any order) -> (b, c): each row's values, then +inf; c = most in a row."""
    r, order = r.sort(stable=True)
    counts = torch.bincount(r, minlength=b)
    rank = torch.arange(len(r), device=r.device) - (counts.cumsum(0) - counts)[r]
    out = torch.full((b, int(counts.max())), math.inf, dtype=v.dtype, device=v.device)
    out[r, rank] = v[order]
    return out


def _merge(best, r, v):
    """best (b, m), each row's m smallest values so far, in place: merged with values v at rows r."""
    if len(r):
        best.copy_(torch.cat([best, _dense(r, v, len(best))], 1).topk(best.shape[1], dim=1, largest=False).values)


def _radii(ops, k, block, ws):
    """Intervals (L, U), L ≤ r² ≤ U, of every point's radius² in its own set (working units)."""
    num, m, dev = len(ops.w), k + 1, ops.w.device
    lo_best = torch.full((num, m), math.inf, device=dev)       # each point's m smallest lower bounds
    hi_best = torch.full((num, m), math.inf, device=dev)       # and m smallest upper bounds
    starts = range(0, num, block)
    for i, j in [(i, i) for i in starts] + [(i, j) for i in starts for j in starts if j > i]:
        rows_i, rows_j = slice(i, i + block), slice(j, j + block)
        lo, absg = lower(ops, rows_i, ops, rows_j, ws)
        if i == j:                        # diagonal tile: its m smallest lower bounds start each list
            v, c = lo.topk(min(m, lo.shape[1]), dim=1, largest=False)
            r = torch.arange(len(v), device=dev)[:, None].expand_as(c).flatten()
            c, v = c.flatten(), v.flatten()
            h = v + 2 * err(absg[r, c], ops, r + i, ops, c + j)
            _merge(lo_best[rows_i], r, v)
            _merge(hi_best[rows_i], r, h)
            continue
        for rows, bound in ((rows_i, hi_best[rows_i, -1][:, None]), (rows_j, hi_best[rows_j, -1][None])):
            r, c = hits(lo, bound, ws)        # later tiles: only entries below the upper bound U so far
            v = lo[r, c]
            h = v + 2 * err(absg[r, c], ops, r + i, ops, c + j)
            own = r if rows is rows_i else c  # the transposed direction: a column's list
            _merge(lo_best[rows], own, v)
            _merge(hi_best[rows], own, h)
    return lo_best[:, -1], hi_best[:, -1]


def _exact_radii(balls, rows, k, block, ws):
    """balls.r2[rows] = the plain radius², where not known yet: each row screened against its set
    again, the candidates lo ≤ U recomputed exactly (all points within r² are among them)."""
    rows = rows.unique()
    rows = rows[balls.r2[rows].isnan()]
    x, ops = balls.x, balls.ops
    for s in range(0, len(rows), block):
        rs = rows[s:s + block]
        found = []
        for j in range(0, len(x), block):
            lo, _ = lower(ops, rs, ops, slice(j, j + block), ws)
            r, c = hits(lo, balls.r2_hi[rs][:, None], ws)
            found.append((r, c + j))
        r, c = (torch.cat(t) for t in zip(*found))
        balls.r2[rs] = _dense(r, exact_sq(x, rs[r], x, c), len(rs)).kthvalue(k + 1, dim=1).values


def _members(inside, ia, ib, v, h, balls, store):
    """Pairs (a, ball b) with v ≤ s²d² ≤ h, from a cross tile: a is inside if h ≤ L of the ball; the
    pairs of a's still open are appended to store with their slack v − U -> their count."""
    sure = h <= balls.r2_lo[ib]
    inside[ia[sure]] = True
    rest = ~inside[ia]
    store.append((ia[rest], ib[rest], (v - balls.r2_hi[ib])[rest]))
    return int(rest.sum())


def _resolve(inside, a, balls, pairs, k, block, s2, ws):
    """Exact membership of open pairs (a index, ball index, slack): a inside ball b if Σ(a − b)² ≤ r²_b.
    Each a's smallest-slack pair first, then the rest of still-open a's; a ball's exact radius only
    where the exact d² (s2: its scale to working units) falls in the ball's interval [L, U]."""
    ia, ib, slack = (torch.cat(t) for t in zip(*pairs))
    keep = ~inside[ia]
    ia, ib, slack = ia[keep], ib[keep], slack[keep]
    order = slack.argsort()
    ia, ib = ia[order], ib[order]
    order = ia.argsort(stable=True)                        # grouped by a, best slack first in each group
    ia, ib = ia[order], ib[order]
    first = torch.ones_like(ia, dtype=torch.bool)
    first[1:] = ia[1:] != ia[:-1]
    for sel in (first, ~first):
        if sel is not first:
            sel = sel & ~inside[ia]
        pa, pb = ia[sel], ib[sel]
        d2 = exact_sq(a, pa, balls.x, pb)
        hit = d2 * s2 <= balls.r2_lo[pb]
        need = ~hit & (d2 * s2 <= balls.r2_hi[pb])
        if need.any():
            _exact_radii(balls, pb[need], k, block, ws)
            hit[need] = d2[need] <= balls.r2[pb[need]]
        inside[pa[hit]] = True


def _flush(inside, a, balls, pairs, k, block, s2, ws):
    if pairs and sum(len(p[0]) for p in pairs):
        _resolve(inside, a, balls, pairs, k, block, s2, ws)
    pairs.clear()


def precision_recall(real, fake, k, block=None, bf16=None):
    """The plain definition's (precision, recall) for finite float tensors real (N, D), fake (M, D) on
    one device, N, M > k, |values| < 1e15 (metrics.precision_recall checks and rescales). block: the
    tiles' side; bf16: bf16 operands (default: where they are faster)."""
    dev = real.device
    block = block or (BLOCK_CUDA if dev.type == "cuda" else BLOCK)
    lowp = bf16_is_faster(dev.type, real.shape[1]) if bf16 is None else bf16
    matmul = torch.backends.mkldnn.matmul, torch.backends.cuda.matmul
    saved = [m.fp32_precision for m in matmul], matmul[1].allow_bf16_reduced_precision_reduction
    for m in matmul:
        m.fp32_precision = "ieee"           # no bf16/TF32 inside float32 GEMMs: the bound assumes float32
    matmul[1].allow_bf16_reduced_precision_reduction = False   # the bf16 bound assumes float32 sums
    # DESIGN: only the GEMMs use the CPU threads; the rest (tile arithmetic, sparse entries) runs on one.
    # On a shared 2-core machine each multi-threaded elementwise op waited ~8 ms for its second thread
    # (a scheduler tick), which made the whole path 3× slower on 2 threads than on 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step = max(1, ROW_CHUNK // real.shape[1])          # the float64 mean, without a float64 copy of real
        centre = sum(real[i:i + step].sum(0, dtype=torch.float64) for i in range(0, len(real), step)) / len(real)
        spread = max(torch.sub(t, centre).abs().max().item() for x in (real, fake) for t in (x.amax(0), x.amin(0)))
        scale = 2.0 ** -math.ceil(math.log2(spread)) if spread > 0 else 1.0   # exact: a power of two
        o_r, o_f = operands(real, centre, scale, lowp), operands(fake, centre, scale, lowp)
        ws = workspace(o_r, block, threads)
        b_r, b_f = (Balls(x, o, *_radii(o, k, block, ws), torch.full((len(x),), math.nan, dtype=torch.float64,
                                                                     device=dev)) for x, o in ((real, o_r), (fake, o_f)))
        fake_in = torch.zeros(len(fake), dtype=torch.bool, device=dev)
        real_in = torch.zeros(len(real), dtype=torch.bool, device=dev)
        open_f, open_r, pending, s2 = [], [], 0, scale ** 2
        for i in range(0, len(fake), block):
            rows = slice(i, i + block)
            for j in range(0, len(real), block):
                cols = slice(j, j + block)
                lo, absg = lower(o_f, rows, o_r, cols, ws)
                for inside, balls, store, bound, keep in (          # precision: fakes in real balls,
                        (fake_in, b_r, open_f, b_r.r2_hi[cols][None], ~fake_in[rows, None]),
                        (real_in, b_f, open_r, b_f.r2_hi[rows][:, None], ~real_in[None, cols])):  # recall
                    r, c = hits(lo, bound, ws, keep)
                    v = lo[r, c]
                    h = v + 2 * err(absg[r, c], o_f, r + i, o_r, c + j)
                    ia, ib = (r + i, c + j) if inside is fake_in else (c + j, r + i)
                    pending += _members(inside, ia, ib, v, h, balls, store)
                if pending > MAX_PENDING:                  # bound memory: resolve what is open so far
                    _flush(fake_in, fake, b_r, open_f, k, block, s2, ws)
                    _flush(real_in, real, b_f, open_r, k, block, s2, ws)
                    pending = 0
        _flush(fake_in, fake, b_r, open_f, k, block, s2, ws)
        _flush(real_in, real, b_f, open_r, k, block, s2, ws)
    finally:
        torch.set_num_threads(threads)
        for m, p in zip(matmul, saved[0]):
            m.fp32_precision = p
        matmul[1].allow_bf16_reduced_precision_reduction = saved[1]
    return fake_in.sum().item() / len(fake), real_in.sum().item() / len(real)
