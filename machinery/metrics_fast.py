"""Fast path of improved precision/recall: GEMM screening under a per-pair error bound, exact answer.

`metrics.precision_recall` calls `precision_recall` below for all but small inputs. It returns what the
plain definition (`metrics.precision_recall_plain`) returns: squared distances Σ(x − y)² of the
given features in float64, radius = (k+1)-th smallest in the point's own set (itself included at
0), membership d² ≤ r². The plain definition costs N·M·D float64 subtractions; here the distances
come from float32 (or bf16) GEMMs, ‖x‖² + ‖y‖² − 2x·y, and every decision the GEMM's rounding could
get wrong is redone with the plain formula (the bound's 1.1 factor also covers the float64
rounding of that formula, so a screened decision is the plain one):

1. Working copies: x̂ = (x − c)·s in float32, c = the real mean, s a power of two that brings the
   largest coordinate to ≤ 1 (no overflow of squares, ‖x̂‖ small near the data; P/R are invariant
   to a common shift and scale, and the exact steps use the original features anyway).
2. Error bound, per pair only (a far point never widens another pair's tolerance):
   |d̃² − s²·d²| ≤ err(x, y) = 1.1·(2γ_D + 10u)(‖x̂‖ + ‖ŷ‖)²   (float32, u = 2⁻²⁴, γ_D = Du/(1 − Du))
   covering the rounding of x̂, of both squared norms, of the dot product and of the two additions
   (Higham, Accuracy and Stability of Numerical Algorithms, §3.1). The bf16 screen (cross tiles only,
   where bf16 GEMMs are fast) adds 2(‖x̃‖‖ŷ−ỹ‖ + ‖x̂−x̃‖‖ỹ‖ + ‖x̂−x̃‖‖ŷ−ỹ‖) + 2·2⁻⁸|g̃| for x̃ = bf16(x̂)
   (Cauchy–Schwarz on the rounding of the inputs, plus the bf16 rounding of the GEMM's result g̃).
3. Radii: in the same-set tiles keep, per point, the CANDIDATES smallest lower bounds d̃² − err,
   whose they are and their upper bounds. Recompute exactly the k+1 of smallest upper bound (their
   largest value t1 bounds the radius² from above), then every other kept candidate whose lower
   bound is ≤ t1 (none for copies, t1 = 0); the radius² is the (k+1)-th smallest exact value, unless
   a dropped point could be closer (its lower bound, ≥ the largest kept one, is below it): only such
   points (more than CANDIDATES near-ties) get their whole row recomputed exactly.
4. Membership: a pair with d̃² + err ≤ r² is inside, one with d̃² − err > r² is not; the rest are
   recomputed exactly, each point's most promising pair first (copies are decided in one step).
"""
import math

import torch

U32, U16 = 2.0 ** -24, 2.0 ** -8   # unit roundoffs of float32 and bfloat16 (24- and 8-bit significands)
BLOCK = 2048             # DESIGN: 2048 × 2048 float32 tiles (16 MiB): GEMM-efficient, memory flat in N
BLOCK_CUDA = 8192        # DESIGN: 256 MiB tiles on GPUs, where small tiles would leave the GEMMs launch-bound
CANDIDATES = 16          # DESIGN: nearest-neighbour candidates kept per point while screening the radii (≥ the
                         # 10 samples per condition of one-shot ImageNet, §8.2, so their near-ties need no full rows)
PAIR_CHUNK = 1 << 22     # DESIGN: float64 elements per exact recomputation (32 MiB)
MAX_PENDING = 1 << 24    # DESIGN: undecided pairs held before they are resolved (≈ 400 MiB at most)


def bf16_is_fast(device):
    """bf16 GEMMs beat float32 on GPUs and on CPUs with AVX512-BF16 or AMX, not elsewhere."""
    if device.type == "cuda":
        return True
    cpu = torch.cpu
    return device.type == "cpu" and any(getattr(cpu, f, lambda: False)()
                                        for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def exact_sq(a, ia, b, ib):
    """Σ(a[ia] − b[ib])² pair by pair in float64 -> (P,): the plain definition's formula (identical
    points give exactly 0), gathered and computed in chunks of PAIR_CHUNK elements."""
    out = torch.empty(len(ia), dtype=torch.float64, device=a.device)
    step = max(1, PAIR_CHUNK // max(1, a.shape[1]))
    for s in range(0, len(ia), step):
        out[s:s + step] = (a[ia[s:s + step]].double() - b[ib[s:s + step]].double()).square_().sum(-1)
    return out


def _working(x, centre, scale, block):
    """float32 (x − centre)·scale, built in row blocks (no float64 copy of the whole set)."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for i in range(0, len(x), block):
        out[i:i + block] = ((x[i:i + block].double() - centre) * scale).float()
    return out


def _tile(x, y, nx, ny, lowp):
    """Squared distances of working rows x (b, D), y (c, D) and their per-pair error bound, float32."""
    gamma = x.shape[1] * U32 / (1 - x.shape[1] * U32)
    sx, sy = nx.square(), ny.square()
    err = (nx[:, None] + ny[None, :]).square_().mul_(1.1 * (2 * gamma + 10 * U32))
    if lowp:
        x16, y16 = x.bfloat16(), y.bfloat16()
        ax, bx = x16.float().norm(dim=1), (x - x16.float()).norm(dim=1)
        ay, by = y16.float().norm(dim=1), (y - y16.float()).norm(dim=1)
        g = (x16 @ y16.T).float()
        err += 2.2 * (ax[:, None] * by[None, :] + bx[:, None] * ay[None, :] + bx[:, None] * by[None, :]
                      + U16 * g.abs())
    else:
        g = x @ y.T
    return torch.add(sy[None, :], g, alpha=-2).add_(sx[:, None]), err


def _keep(lo, cand, hi, low, err, first_col):
    """Merge a tile's lower bounds `low` (b, c) into each row's len(lo[0]) smallest (in place), with
    the column indices and upper bounds low + 2 err of the entries kept."""
    v, order = low.topk(min(lo.shape[1], low.shape[1]), dim=1, largest=False)
    new_hi = v + 2 * err.gather(1, order)
    v, pick = torch.cat([lo, v], 1).topk(lo.shape[1], dim=1, largest=False)
    lo.copy_(v)
    cand.copy_(torch.cat([cand, order + first_col], 1).gather(1, pick))
    hi.copy_(torch.cat([hi, new_hi], 1).gather(1, pick))


def _exact_kth(x, rows, k):
    """Plain-definition radius² of points `rows` of x: (k+1)-th smallest Σ(x_r − x_j)² over all j."""
    step = max(1, PAIR_CHUNK // (len(x) * x.shape[1]))
    return torch.cat([(x[rows[s:s + step], None].double() - x[None].double()).square_().sum(-1)
                      .kthvalue(k + 1, dim=1).values for s in range(0, len(rows), step)])


def _radii(x, w, nw, k, block, scale):
    """Exact radius² (original units, float64) of every point of x from its working copy w."""
    n, dev = len(x), x.device
    m = min(n, max(CANDIDATES, 2 * (k + 1)))
    lo = torch.full((n, m), float("inf"), device=dev)             # smallest lower bounds d̃² − err,
    hi = torch.full((n, m), float("inf"), device=dev)             # their upper bounds d̃² + err
    cand = torch.zeros((n, m), dtype=torch.long, device=dev)      # and whose they are
    for i in range(0, n, block):
        for j in range(i, n, block):             # symmetric: tile (i, j) serves the rows of both
            d2, err = _tile(w[i:i + block], w[j:j + block], nw[i:i + block], nw[j:j + block], False)
            low = d2.sub_(err)                                            # lower bounds, in place
            _keep(lo[i:i + block], cand[i:i + block], hi[i:i + block], low, err, j)
            if j > i:
                _keep(lo[j:j + block], cand[j:j + block], hi[j:j + block], low.T, err.T, i)
    # 1) the k+1 candidates of smallest upper bound, exactly: their largest value t1 ≥ the radius²
    rows = torch.arange(n, device=dev)[:, None]
    first = hi.topk(k + 1, dim=1, largest=False).indices                     # (n, k+1)
    exact = torch.full((n, m), float("inf"), dtype=torch.float64, device=dev)
    exact[rows, first] = exact_sq(x, rows.expand_as(first).flatten(), x,
                                  cand.gather(1, first).flatten()).view(n, k + 1)
    t1 = exact.gather(1, first).amax(1)
    # 2) any other candidate that could lie below t1 (none for copies, where t1 = 0)
    r, c = ((lo.double() <= (t1 * scale ** 2)[:, None]) & exact.isinf() & (t1 > 0)[:, None]).nonzero(
        as_tuple=True)
    exact[r, c] = exact_sq(x, r, x, cand[r, c])
    r2 = exact.sort(1).values[:, k]
    # exact unless a dropped point (lower bound ≥ the m-th kept one) could be closer than r2
    unsure = (r2 > 0) & (lo[:, -1].double() < r2 * scale ** 2) & (m < n)
    if unsure.any():
        rows = unsure.nonzero().squeeze(1)
        r2[rows] = _exact_kth(x, rows, k)
    return r2


def _resolve(inside, a, b, r2_b, pairs):
    """Exact membership for undecided pairs (a index, b index, slack): a inside b's ball if
    Σ(a − b)² ≤ r2_b[b]. Each a's smallest-slack pair first, then the rest of still-open a's."""
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
        hit = exact_sq(a, pa, b, pb) <= r2_b[pb]
        inside[pa[hit]] = True


def precision_recall(real, fake, k, block=None, bf16=None):
    """The plain definition's (precision, recall) for finite float tensors real (N, D), fake (M, D) on
    one device, N, M > k, |values| < 1e15 (metrics.precision_recall checks and rescales)."""
    dev = real.device
    block = block or (BLOCK_CUDA if dev.type == "cuda" else BLOCK)
    bf16 = bf16_is_fast(dev) if bf16 is None else bf16
    flags = torch.backends.cuda.matmul
    saved = flags.allow_tf32, flags.allow_bf16_reduced_precision_reduction
    flags.allow_tf32 = False                          # TF32's 10-bit mantissa would break the bound
    flags.allow_bf16_reduced_precision_reduction = False   # the bf16 bound assumes float32 sums
    try:
        centre = real.mean(0, dtype=torch.float64)
        spread = max((x[i:i + block].double() - centre).abs().max().item()
                     for x in (real, fake) for i in range(0, len(x), block))
        scale = 2.0 ** -math.ceil(math.log2(spread)) if spread > 0 else 1.0   # exact: a power of two
        wr, wf = _working(real, centre, scale, block), _working(fake, centre, scale, block)
        nr, nf = wr.norm(dim=1), wf.norm(dim=1)
        # DESIGN: radius tiles are half of `block`: the diagonal tiles, computed in full, then waste
        # 1/4 of their area instead of 1/2
        half = max(block // 2, 1)
        r2_real, r2_fake = _radii(real, wr, nr, k, half, scale), _radii(fake, wf, nf, k, half, scale)
        rr, rf = (r2_real * scale ** 2).float(), (r2_fake * scale ** 2).float()   # working units
        fake_in = torch.zeros(len(fake), dtype=torch.bool, device=dev)
        real_in = torch.zeros(len(real), dtype=torch.bool, device=dev)
        open_f, open_r, pending = [], [], 0
        for i in range(0, len(fake), block):
            fi = slice(i, i + block)
            for j in range(0, len(real), block):
                rj = slice(j, j + block)
                d2, err = _tile(wf[fi], wr[rj], nf[fi], nr[rj], bf16)
                hi, lo = d2 + err, d2.sub_(err)
                for ins, hi_, lo_, r2, r_idx, c_idx, store in (           # precision: fakes in real balls
                        (fake_in[fi], hi, lo, rr[rj][None, :], i, j, open_f),
                        (real_in[rj], hi.T, lo.T, rf[fi][:, None].T, j, i, open_r)):  # recall: reals in fake balls
                    ins |= (hi_ <= r2 * (1 - 4 * U32)).any(1)             # + the rounding of r2 itself
                    r, c = ((lo_ <= r2 * (1 + 4 * U32)) & ~ins[:, None]).nonzero(as_tuple=True)
                    store.append((r + r_idx, c + c_idx, lo_[r, c] - r2[0, c]))
                    pending += len(r)
                if pending > MAX_PENDING:                  # bound memory: resolve what is open so far
                    _flush(fake_in, fake, real, r2_real, open_f)
                    _flush(real_in, real, fake, r2_fake, open_r)
                    pending = 0
        _flush(fake_in, fake, real, r2_real, open_f)
        _flush(real_in, real, fake, r2_fake, open_r)
    finally:
        flags.allow_tf32, flags.allow_bf16_reduced_precision_reduction = saved
    return fake_in.sum().item() / len(fake), real_in.sum().item() / len(real)


def _flush(inside, a, b, r2_b, pairs):
    if pairs and sum(len(p[0]) for p in pairs):
        _resolve(inside, a, b, r2_b, pairs)
    pairs.clear()
