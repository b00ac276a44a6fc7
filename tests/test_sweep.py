"""experiments/sweep.py (issue 20 study): the token probe's ridge regression and the SWEEP.md tables.

The runs themselves (minutes to hours) are not repeated here; what is checked is the arithmetic a reader
takes from SWEEP.md: the probe equals the textbook (primal) ridge solution, and the tables quote the
stored numbers with the binomial std of a share."""
import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import copying  # noqa: E402
import sweep  # noqa: E402
import token_probe  # noqa: E402


def test_probe_ridge_is_the_primal_ridge_solution():
    """Dual form (n x n kernel) == primal (d x d normal equations) on standardised features, computed in numpy."""
    rng = np.random.default_rng(0)
    f_tr, f_te = rng.normal(size=(40, 7)) * [1, 2, 3, 4, 5, 6, 7] + 3, rng.normal(size=(9, 7))
    y_tr = f_tr @ rng.normal(size=(7, 2)) + rng.normal(size=(40, 2)) * 0.1
    got = token_probe.ridge_fit_eval(*(torch.from_numpy(a) for a in (f_tr, y_tr, f_te, np.zeros((9, 2)))), lam=0.3)
    mu, sd = f_tr.mean(0), f_tr.std(0, ddof=1) + 1e-6               # torch.std is the unbiased std
    a, b = (f_tr - mu) / sd, (f_te - mu) / sd
    lam = 0.3 * np.trace(a @ a.T) / len(a)                          # the ridge scales with the mean kernel diagonal
    w = np.linalg.solve(a.T @ a + lam * np.eye(7), a.T @ (y_tr - y_tr.mean(0)))
    np.testing.assert_allclose(got.numpy(), b @ w + y_tr.mean(0), rtol=1e-8, atol=1e-8)


def test_probe_recovers_what_the_features_determine():
    """Features that are an invertible linear map of the target: near-zero error; noise features: none."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(300, 5, generator=g, dtype=torch.float64)
    f = y @ torch.randn(5, 12, generator=g, dtype=torch.float64)
    pred = token_probe.ridge_fit_eval(f[:200], y[:200], f[200:], y[200:], lam=1e-8)
    assert (pred - y[200:]).abs().max() < 1e-3
    noise = torch.randn(300, 12, generator=g, dtype=torch.float64)
    pred = token_probe.ridge_fit_eval(noise[:200], y[:200], noise[200:], y[200:], lam=1e-2)
    assert (pred - y[200:]).square().mean() > 0.5 * y[200:].var()


def test_lowrank_probe_reads_only_the_dominant_directions():
    """A target carried by a low-variance direction, under a high-variance nuisance: the top-1 component
    misses it (error of the mean predictor), the top 2 recover it; the variance share is the top
    eigenvalues' share of the sample covariance, computed here with numpy."""
    rng = np.random.default_rng(1)
    y = rng.normal(size=(400, 1))
    nuisance = rng.normal(size=(400, 1)) * 10                      # the dominant direction carries no target
    rot = np.linalg.qr(rng.normal(size=(5, 5)))[0]                 # mixed into every feature dimension
    f = np.hstack([nuisance, y, rng.normal(size=(400, 3)) * 0.01]) @ rot.T + 2.0
    t = lambda a: torch.from_numpy(a)                              # noqa: E731
    pred1, share1 = token_probe.lowrank_fit_eval(t(f[:300]), t(y[:300]), t(f[300:]), 1, lam=1e-8)
    pred2, share2 = token_probe.lowrank_fit_eval(t(f[:300]), t(y[:300]), t(f[300:]), 2, lam=1e-8)
    assert ((pred1.numpy() - y[300:]) ** 2).mean() > 0.8 * y[300:].var()
    assert np.abs(pred2.numpy() - y[300:]).max() < 0.05
    ev = np.sort(np.linalg.eigvalsh(np.cov(f[:300].T)))[::-1]
    assert share1 == pytest.approx(ev[0] / ev.sum(), rel=1e-9)
    assert share2 == pytest.approx(ev[:2].sum() / ev.sum(), rel=1e-9)


def test_local_probe_is_a_shared_primal_ridge_per_patch():
    """local_fit_eval against numpy, built independently: patches cut by loops, tokens and patches centred per
    position, one ridge map from a token's D dims to its own patch's 3 P^2 pixels; and a token that is a linear
    image of its own patch is read back almost exactly, while tokens that only hold other positions' patches
    are not."""
    rng = np.random.default_rng(1)
    b, g, p, d = 30, 2, 2, 5
    x = rng.normal(size=(b + 10, 3, g * p, g * p))
    tok = rng.normal(size=(b + 10, g * g, d))
    got = token_probe.local_fit_eval(*(torch.from_numpy(a) for a in (tok[:b], x[:b], tok[b:], x[b:])), p, lam=0.05)
    y = np.stack([np.stack([x[n, :, i * p:(i + 1) * p, j * p:(j + 1) * p].ravel() for i in range(g) for j in range(g)])
                  for n in range(len(x))])                                 # (B, G*G, 3*P*P), raster order
    t_mu, y_mu = tok[:b].mean(0), y[:b].mean(0)
    a = (tok[:b] - t_mu).reshape(-1, d)
    sd = a.std(0, ddof=1) + 1e-6
    a = a / sd
    w = np.linalg.solve(a.T @ a + 0.05 * (a ** 2).sum(1).mean() * np.eye(d), a.T @ (y[:b] - y_mu).reshape(-1, 3 * p * p))
    pred = ((tok[b:] - t_mu) / sd) @ w + y_mu
    assert got == pytest.approx(np.sqrt(((pred - y[b:]) ** 2).mean()), rel=1e-9)
    xs = torch.from_numpy(rng.normal(size=(400, 3, 8, 8)))
    own = torch.stack([xs[:, :, i:i + 4, j:j + 4].flatten(1) for i in (0, 4) for j in (0, 4)], 1)   # (400, 4, 48)
    proj = torch.from_numpy(rng.normal(size=(48, 64)))
    assert token_probe.local_fit_eval(own[:300] @ proj, xs[:300], own[300:] @ proj, xs[300:], 4, lam=1e-6) < 0.01
    other = own.roll(1, dims=1) @ proj                                     # each token holds its neighbour's patch
    assert token_probe.local_fit_eval(other[:300], xs[:300], other[300:], xs[300:], 4, lam=1e-6) > 0.9


def test_position_shared_share_by_hand():
    """Worked by hand: 2 images x 2 positions x 1 channel, tokens [1, 3] and [-1, -3]: centred over images they
    stay; the image means 2 and -2 at both positions give 16 of the total 20. Tokens equal at every position:
    1; independent positions: about 1/N."""
    tok = torch.tensor([[[1.0], [3.0]], [[-1.0], [-3.0]]], dtype=torch.float64)
    assert token_probe.position_shared_share(tok) == pytest.approx(0.8)
    offset = torch.tensor([[[5.0], [-2.0]]], dtype=torch.float64)   # the same for every image: centred away
    assert token_probe.position_shared_share(tok + offset) == pytest.approx(0.8)
    g = torch.Generator().manual_seed(0)
    same = torch.randn(50, 1, 4, generator=g, dtype=torch.float64).expand(50, 16, 4)
    assert token_probe.position_shared_share(same) == pytest.approx(1.0)
    assert token_probe.position_shared_share(torch.randn(4000, 16, 4, generator=g, dtype=torch.float64)) == \
        pytest.approx(1 / 16, abs=0.005)


def test_zero_encoder_steps_is_the_random_encoder():
    """The --encoder-steps help says 0 steps is the random encoder's row: the recipe's untrained network is the
    default job's random tiny encoder (same seed, same weights)."""
    import encoders
    import features
    images, page, _ = features.page_bank(4, features.ENCODER_PAGES_SEED)
    got = features.train_encoder(images, page, 0, log=lambda *a: None).state_dict()
    want = encoders.load_encoder("tiny", seed=0).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="'encoder' or 'features'"):
        features.pretrained_network("/nonexistent", "encoders", 1, 4)


def test_markdown_quotes_the_stored_numbers(tmp_path):
    part = dict(command="python experiments/sweep.py --parts length --lengths 600,2000", seconds=90.0, machine="m")
    res = {"length": dict(part, rows={"2000": dict(loss=0.05, pages=48, n=2, agreement=0.25, sample_accuracy=0.2,
                                                   real_accuracy=0.99),
                                      "600": dict(loss=0.06, pages=48, n=2, agreement=0.125, sample_accuracy=0.1,
                                                  real_accuracy=0.99)}),
           "ddpm": dict(part, ckpt_step=2000, rows={"16": dict(agreement=0.5, pages=32, n=2, sample_seconds=3.0)}),
           "probe": dict(part, train_images=10, test_images=5,
                         results={"baseline (mean image)": dict(pixel_rmse=0.5),
                                  "x, tokens": dict(pixel_rmse=0.1, kind_accuracy=0.3)},
                         lowrank={"x, tokens": {"full": 0.1, "dims": 12, "4": dict(pixel_rmse=0.31, variance_share=0.864),
                                                "16": dict(pixel_rmse=0.2, variance_share=0.951),
                                                "position_shared": 0.873, "local": 0.1234},
                                  "mean colour": {"full": 0.3, "dims": 3}}),
           "phases": dict(part, results={"render synthetic images": 1000.0})}
    path = tmp_path / "SWEEP.md"
    sweep.write_markdown(json.loads(json.dumps(res)), str(path))
    md = path.read_text()
    std = lambda p, n: (p * (1 - p) / n) ** 0.5                     # noqa: E731
    assert f"| 600 | 19200 | 0.0600 | 0.125 ± {std(0.125, 96):.3f} | 0.100 / 0.990 |" in md
    assert md.index("| 600 |") < md.index("| 2000 |")              # rows in training order, not string order
    assert f"| 16 | 0.500 ± {std(0.5, 64):.3f} | 3.0 |" in md
    assert "| x, tokens | 0.100 | 0.300 |" in md and "| baseline (mean image) | 0.500 | - |" in md
    assert ("| features (dims) | all dims | top 4 | top 16 | variance shared by all positions | local probe: own patch "
            "from own token |") in md
    assert "| x, tokens (12) | 0.100 | 0.310 (0.86) | 0.200 (0.95) | 0.87 | 0.123 |" in md
    assert "| mean colour (3) | 0.300 | - | - | - | - |" in md
    assert "| render synthetic images | 1000.0 |" in md and "1.5 min" in md


def test_bad_arguments_are_one_line_errors(capsys, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    for name, payload in (("junk", None), ("noema", {"format": "semantica-ckpt/2", "model_config": {}, "p_uncond": 0.1,
                                                     "encoder": None, "step": 5})):
        (tmp_path / name / "length").mkdir(parents=True)
        if payload is None:
            (tmp_path / name / "length" / "ckpt_5.pt").write_text("truncated")
        else:
            torch.save(payload, tmp_path / name / "length" / "ckpt_5.pt")
    for argv, msg in ((["--parts", "phases,nope"], "unknown parts"), (["--lengths", "600,x"], "integers"),
                      (["--parts", "probe", "--encoder-steps", "10,x"], "integers"),
                      (["--parts", "probe", "--encoder-steps", "-1"], "not negative"),
                      (["--parts", ","], "names no part"), (["--lengths", "-5"], "positive"),
                      (["--parts", "probe", "--encoder-weights", "/nonexistent.pth"], "no encoder file"),
                      (["--parts", "probe", "--encoder-weights", str(bad)], "not a loadable encoder"),
                      (["--parts", "ddpm", "--out", str(tmp_path / "new")], "run --parts length first"),
                      (["--parts", "use", "--out", str(tmp_path / "new")], "run --parts length first"),
                      (["--parts", "use", "--lengths", "5", "--out", str(tmp_path / "junk")], "not a usable"),
                      (["--parts", "ddpm", "--lengths", "5", "--out", str(tmp_path / "noema")], "no EMA weights"),
                      (["--parts", "phases", "--out", str(bad)], "exists and is not a folder"),
                      (["--parts", "phases", "--out", str(tmp_path / "w"), "--results", str(tmp_path)], "is a folder"),
                      (["--parts", "phases", "--out", str(tmp_path / "w"), "--results", str(bad / "S.md")],
                       "is a file, not a folder")):
        with pytest.raises(SystemExit) as e:
            sweep.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err, argv
    assert not (tmp_path / "new").exists()                         # refused before anything is written
    assert not (tmp_path / "junk" / "sweep.json").exists()


class _StubModel:
    """What condition_use needs of a Semantica: config.image_size, as_cond, null_cond and net(z_t, t, cond).
    Its 'condition' is the image itself; its v prediction mixes the condition (`coef`; 0: ignored), z_t and t,
    so a wrong z_t, t or condition changes the loss."""

    def __init__(self, coef):
        self.config = type("C", (), {"image_size": 8})()
        self.null_cond = torch.full((1, 3, 8, 8), 0.25)
        self.net = lambda z, t, c: coef * c + 0.3 * z + 0.1 * t.view(-1, 1, 1, 1)

    def as_cond(self, images):
        return images


class _StubTokenModel(_StubModel):
    """_StubModel with cross-attention-shaped conditions: tokens (B, 64, 3), one per pixel, D = 3 channels."""

    def __init__(self, coef):
        super().__init__(coef)
        self.null_cond = torch.full((1, 64, 3), 0.25)
        self.net = lambda z, t, c: coef * c.transpose(1, 2).reshape(z.shape) + 0.3 * z + 0.1 * t.view(-1, 1, 1, 1)

    def as_cond(self, images):
        return images.flatten(2).transpose(1, 2)


def _expected_use(model, n, ts, seed, chunks, vectors=None):
    """The same measurement by hand: the clipped cosine schedule in closed form (simple diffusion's pseudocode:
    logsnr = -2 log tan(a + t (b - a)), a = atan(exp(-7.5)), b = atan(exp(7.5))), shifted by the 32 px noise
    resolution at 8 px (+2 log(32 / 8)); eps_hat = sigma z + alpha v_hat; squared error per pair, the gap's
    standard error from the chunk means of the paired differences."""
    from pages import synthetic
    pages = synthetic.SyntheticPages(n, 8, seed=token_probe.PROBE_PAGES_SEED)
    x = torch.stack([pages.image(p, 1) for p in range(n)]).double()
    c = torch.stack([pages.image(p, 0) for p in range(n)]).double()
    conds = dict(true=c, shuffled=torch.cat([c[-1:], c[:-1]]), null=torch.full_like(c, 0.25))
    if vectors is not None:          # oracle: the condition plus its kind's vector / the next kind's, per pixel
        kind = [pages.kind(p, 0) for p in range(n)]
        conds["true"] = c + torch.stack([vectors[k] for k in kind]).double()[:, :, None, None]
        conds["shuffled"] = c + torch.stack([vectors[(k + 1) % 8] for k in kind]).double()[:, :, None, None]
        model = type("M", (), {"net": staticmethod(lambda z, t, v, f=model.net: f(z, t, v.flatten(2).transpose(1, 2)))})
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in ts:
        eps = torch.randn(x.shape, generator=g).double()
        a, b = np.arctan(np.exp(-7.5)), np.arctan(np.exp(7.5))
        logsnr = -2 * np.log(np.tan(a + t * (b - a))) + 2 * np.log(32 / 8)
        alpha, sigma = np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))
        z = alpha * x + sigma * eps
        tt = torch.full((n,), t, dtype=torch.float64)
        per = {k: ((eps - (sigma * z + alpha * model.net(z, tt, v))) ** 2).flatten(1).mean(1) for k, v in conds.items()}
        gap_chunks = (per["shuffled"] - per["true"]).view(chunks, -1).mean(1)
        out[str(t)] = dict({k: v.mean().item() for k, v in per.items()}, gap=gap_chunks.mean().item(),
                           gap_se=gap_chunks.std().item() / chunks ** 0.5)
    return out


@pytest.mark.parametrize("coef", [0.0, 0.7])
def test_condition_use_measures_the_loss_under_each_condition(coef):
    model, ts = _StubModel(coef), (0.3, 0.9)
    got = sweep.condition_use(model, n=8, ts=ts, seed=3, chunks=4)
    want = _expected_use(model, 8, ts, 3, 4)
    for t in ts:
        for k in ("true", "shuffled", "null", "gap", "gap_se"):
            assert got[str(t)][k] == pytest.approx(want[str(t)][k], rel=1e-4, abs=1e-7), (coef, t, k)
        if coef == 0:                                               # a model that ignores its condition: all alike
            assert got[str(t)]["true"] == got[str(t)]["shuffled"] == got[str(t)]["null"]
            assert got[str(t)]["gap"] == 0
        else:
            assert len({round(v, 6) for v in list(got[str(t)].values())[:3]}) == 3
    with pytest.raises(ValueError, match="multiple of chunks"):
        sweep.condition_use(model, n=6, ts=ts, chunks=4)


def test_oracle_use_compares_the_conditions_kind_vector_with_another_kinds():
    vectors = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    model, ts = _StubTokenModel(0.7), (0.3, 0.9)
    got = sweep.condition_use(model, n=16, ts=ts, seed=3, chunks=4, kind_vectors=vectors)
    want = _expected_use(model, 16, ts, 3, 4, vectors)
    for t in ts:
        for k in ("true", "shuffled", "null", "gap", "gap_se"):
            assert got[str(t)][k] == pytest.approx(want[str(t)][k], rel=1e-4, abs=1e-7), (t, k)
    plain = sweep.condition_use(model, n=16, ts=ts, seed=3, chunks=4)          # without vectors: the use part
    assert plain[str(0.3)]["true"] != got[str(0.3)]["true"] and plain[str(0.3)]["null"] == got[str(0.3)]["null"]


def test_length_part_leaves_kept_rows_alone(monkeypatch, tmp_path):
    """Every length measured and its checkpoint kept: nothing is trained, loaded, scored or added to the rows."""
    (tmp_path / "length").mkdir()
    (tmp_path / "length" / "ckpt_600.pt").write_bytes(b"kept")
    style = synthetic.SyntheticPages(1)
    state = dict(settings=dict(eval=dict(sweep.EVAL), max_objects=list(style.max_objects),
                               object_scale=list(style.object_scale)),
                 rows={"600": dict(loss=0.05, pages=48, n=2, agreement=0.1, sample_accuracy=0.1, real_accuracy=0.99)})
    before = json.loads(json.dumps(state))

    def nothing(*a, **k):
        raise AssertionError("a kept length was redone")
    monkeypatch.setattr(copying.kept_runs, "train_to", nothing)
    monkeypatch.setattr(sweep, "oracle_use", nothing)
    monkeypatch.setattr(sweep.kinds, "evaluate_checkpoint", nothing)
    monkeypatch.setattr(sweep.oracle, "load", nothing)
    assert sweep.length(str(tmp_path), [600], None, state) == before


def test_use_reads_each_lengths_ema_checkpoint(monkeypatch, tmp_path):
    seen = []

    def load(path, **kw):
        seen.append((os.path.basename(path), kw.get("ema", True)))
        return _StubModel(0.5)
    monkeypatch.setattr(sweep.semantica.Semantica, "from_checkpoint", staticmethod(load))
    monkeypatch.setattr(sweep, "condition_use", lambda model, n: {"0.5": dict(true=float(n))})
    out = sweep.use(str(tmp_path), [600, 2000])
    assert seen == [("ckpt_600.pt", True), ("ckpt_2000.pt", True)]
    assert set(out["rows"]) == {"600", "2000"} and out["pairs"] == out["rows"]["600"]["0.5"]["true"] == 128


def test_markdown_use_table(tmp_path):
    res = {"use": dict(command="c", seconds=60.0, machine="m", pairs=64,
                       rows={"600": {"0.9": dict(true=0.002, shuffled=0.0025, null=0.0021, gap=0.0005, gap_se=0.0001)}})}
    sweep.write_markdown(res, str(tmp_path / "S.md"))
    md = (tmp_path / "S.md").read_text()
    assert "| 600 | 0.9 | 0.0020 | 0.0025 | 0.0021 | 0.00050 ± 0.00010 | +25 % |" in md
    assert "of 64 held-out page pairs" in md and "8 chunks of 8 pairs" in md


# ----------------------------------------------------------------------------- the oracle-condition run

import oracle  # noqa: E402  (experiments/oracle.py)
from pages import synthetic  # noqa: E402


def _kind_vectors_by_hand(dim):
    """e_k as documented: N(0, 1) entries from a generator seeded 7, one row per kind."""
    return torch.randn(len(synthetic.KINDS), dim, generator=torch.Generator().manual_seed(7))


def test_oracle_condition_is_the_tokens_plus_the_kind_vector_on_every_token():
    model = oracle.new_state()["model"]
    pages = synthetic.SyntheticPages(3, 32, seed=1)
    x = torch.stack([pages.image(p, 0) for p in range(3)])
    kind = torch.tensor([0, 3, 3])
    vectors = _kind_vectors_by_hand(model.config.cond_dim)
    got = oracle.oracle_cond(model, x, kind, oracle.kind_vectors(model.config.cond_dim))
    tokens = model.encoder(model.encoder.preprocess(x))[1]           # the random tiny encoder's tokens
    torch.testing.assert_close(got, tokens + vectors[kind][:, None, :])
    other = oracle.oracle_cond(model, x, torch.tensor([5, 3, 3]), oracle.kind_vectors(model.config.cond_dim))
    torch.testing.assert_close((got - other)[0], (vectors[0] - vectors[5]).expand_as(got[0]))   # every token


def _small_job():
    return dict(oracle.JOB, num_pages=64, batch=8)


def test_oracle_run_trains_on_page_pairs_with_the_conditions_kind(monkeypatch):
    """Step s trains on pairs s*B .. s*B+B-1 of data.PagePairs; the oracle vector is the kind drawn in the
    *condition* (an outlier image differs from its page's kind), computed here from the pages by hand."""
    import data
    job, seen = _small_job(), []
    original = oracle.semantica.Semantica.loss

    def spy(self, target, cond, generator=None):
        seen.append((target.clone(), cond.clone()))
        return original(self, target, cond, generator=generator)
    monkeypatch.setattr(oracle.semantica.Semantica, "loss", spy)
    state = oracle.new_state(job)
    oracle.train(state, 6, job=job, log=lambda *a: None)
    assert state["step"] == 6 and len(seen) == 6
    pages = synthetic.SyntheticPages(64, 32, seed=0)
    pairs = data.PagePairs(pages, mode="page", seed=0)
    vectors, model, outliers = _kind_vectors_by_hand(128), state["model"], 0
    for s, (target, cond) in enumerate(seen):
        items = [pairs.pair(s * 8 + j) for j in range(8)]
        xc = torch.stack([pages.image(p, c) for p, c, _ in items])
        torch.testing.assert_close(target, torch.stack([pages.image(p, t) for p, _, t in items]))
        kind = torch.tensor([pages.kind(p, c) for p, c, _ in items])
        outliers += sum(pages.kind(p, c) != pages.label(p) for p, c, _ in items)
        torch.testing.assert_close(cond, model.encoder(model.encoder.preprocess(xc))[1] + vectors[kind][:, None])
    assert outliers > 0                                             # the condition's kind was really tested


def test_oracle_run_resumes_exactly(tmp_path):
    job = _small_job()
    whole = oracle.new_state(job)
    oracle.train(whole, 3, job=job, log=lambda *a: None)
    part = oracle.new_state(job)
    oracle.train(part, 2, job=job, log=lambda *a: None)
    oracle.save(part, str(tmp_path / "s.pt"))
    again = oracle.load(str(tmp_path / "s.pt"), job=job)
    assert again["step"] == 2
    oracle.train(again, 3, job=job, log=lambda *a: None)
    for key in ("model", "ema"):
        for (name, a), b in zip(whole[key].state_dict().items(), again[key].state_dict().values()):
            assert torch.equal(a, b), (key, name)
    assert not (tmp_path / "s.pt.tmp").exists()


def test_oracle_part_keeps_each_length_and_resumes(monkeypatch, tmp_path):
    monkeypatch.setitem(sweep.EVAL, "pages", 2)
    monkeypatch.setitem(sweep.EVAL, "steps", 2)
    monkeypatch.setattr(sweep, "USE_PAIRS", 8)
    trained = []
    real_train = oracle.train

    def train(state, steps, **kw):
        trained.append((state["step"], steps))
        return real_train(state, steps, **kw)
    monkeypatch.setattr(oracle, "train", train)
    sampled_kinds, real_sample = [], oracle.sample

    def sample(state, cond, kind, *a):
        sampled_kinds.append(kind.clone())
        return real_sample(state, cond, kind, *a)
    monkeypatch.setattr(oracle, "sample", sample)
    classifier = sweep.kinds.KindCNN()
    state = sweep.oracle_part(str(tmp_path), [1, 2], classifier, {})
    state = json.loads(json.dumps(state))
    first_use = state["rows"]["1"].pop("use")                       # a row kept from before the use columns
    state = sweep.oracle_part(str(tmp_path), [1, 2, 3], classifier, state)
    assert trained == [(0, 1), (1, 2), (2, 3)]                      # each length once, resumed from the last
    assert all(state["rows"]["1"]["use"][t] == pytest.approx(u) for t, u in first_use.items())  # from the kept state
    assert all(set(state["rows"][s]["use"]) == {str(t) for t in sweep.USE_T} for s in ("1", "2", "3"))
    pages = synthetic.SyntheticPages(2, 32, seed=sweep.kinds.TEST_PAGES_SEED, p_outlier=0.0, p_duplicate=0.0)
    truth = torch.tensor([pages.label(p) for p in range(2)])         # the held-out conditions' true kinds
    assert len(sampled_kinds) == 3 and all(torch.equal(k, truth) for k in sampled_kinds)
    assert set(state["rows"]) == {"1", "2", "3"}
    for s in (1, 2, 3):
        assert (tmp_path / "oracle" / f"state_{s}.pt").exists() and (tmp_path / f"oracle_{s}.png").exists()
        assert torch.load(tmp_path / "oracle" / f"state_{s}.pt", weights_only=True)["step"] == s
        r = state["rows"][str(s)]
        assert r["pages"] == 2 and r["n"] == 2 and 0 <= r["agreement"] <= 1 and r["loss"] > 0


def test_markdown_oracle_table(tmp_path):
    res = {"oracle": dict(command="c", seconds=60.0, machine="m",
                          rows={"600": dict(loss=0.05, pages=48, n=2, agreement=0.5, sample_accuracy=0.25,
                                            real_accuracy=0.99)})}
    sweep.write_markdown(res, str(tmp_path / "S.md"))
    std = (0.5 * 0.5 / 96) ** 0.5
    md = (tmp_path / "S.md").read_text()
    assert f"| 600 | 19200 | 0.0500 | 0.500 ± {std:.3f} | 0.250 / 0.990 |" in md and "another kind" not in md
    res["oracle"]["rows"]["600"]["use"] = {"0.8": dict(true=0.004, shuffled=0.005, null=0.0045, gap=0.001, gap_se=0.0002)}
    sweep.write_markdown(res, str(tmp_path / "S.md"))
    md = (tmp_path / "S.md").read_text()
    assert "| 600 | 0.8 | 0.0040 | 0.0050 | 0.0045 | 0.00100 ± 0.00020 | +25 % |" in md and "another kind" in md


def test_oracle_job_is_the_default_jobs_flags():
    """oracle.JOB restates train.py's default job by hand (it cannot run train.py): it must not drift."""
    import train
    cfg = train.TrainConfig(**train.RES_PRESETS[32])
    job = oracle.JOB
    assert (job["model"], job["num_pages"], job["batch"], job["lr"], job["ema_decay"], job["seed"]) == \
        (cfg.model, cfg.num_pages, cfg.batch, cfg.lr, cfg.ema_decay, cfg.seed)
    assert job["betas"] == (cfg.beta1, cfg.beta2) and job["eps"] == cfg.adam_eps
    assert cfg.encoder == "tiny" and cfg.random_encoder and cfg.data == "synthetic" and cfg.pairs == "page"
    assert oracle.new_state(dict(job, model="tiny-32"))["model"].p_uncond == cfg.p_uncond
    assert (cfg.filter_low, cfg.filter_high) == (-1.0, 1.0)           # no pair filter, as the loop assumes


def test_machine_line_names_cpu_simd_and_threads(monkeypatch):
    """The provenance line of SWEEP.md / RESULTS.md: AVX-512 (and its bf16) read from the CPU flags, the
    thread count as torch reports it; results from AVX2 and AVX-512 CPUs differ, so the line must tell them apart."""
    import builtins
    import io

    import machine
    info = {"avx512": "model name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n",
            "avx2": "model name\t: Old CPU\nflags\t\t: fpu sse2 avx2\n"}
    real_open, real_exists = builtins.open, os.path.exists
    for kind, text in info.items():
        monkeypatch.setattr(os.path, "exists", lambda p: p == "/proc/cpuinfo" or real_exists(p))
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: io.StringIO(text) if p == "/proc/cpuinfo"
                            else real_open(p, *a, **k))
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
        line = machine.describe()
        want = "Test CPU 9000, " if kind == "avx512" else "Old CPU, "
        assert want in line and line.endswith(f"torch {torch.__version__}, 3 thread(s)")
        assert ("AVX-512 + bf16" in line) == (kind == "avx512") and ("no AVX-512" in line) == (kind == "avx2")


class _CopyStub:
    """What copy_scores needs of a Semantica: net.config.image_size and sample(); sample 0 of each condition is
    the condition itself, sample 1 the condition plus 0.1 on every pixel (a known copy and a known offset)."""

    def __init__(self):
        self.net = type("N", (), {"config": type("C", (), {"image_size": 8})()})()
        self.calls = []

    def sample(self, cond_images=None, num_samples=1, guidance=0.5, steps=256, seed=0, cond=None):
        self.calls.append((num_samples, guidance, steps))
        if cond is not None:                      # tokens (B, 64, 3) of condition(): back to the images
            self.tokens = cond
            cond_images = cond[:, 1:].transpose(1, 2).reshape(len(cond), 3, 8, 8)
        return torch.stack([cond_images, cond_images + 0.1], 1)

    def condition(self, images):                  # a CLS token of 5s, then one token per pixel (its 3 colours)
        return torch.cat([torch.full((len(images), 1, 3), 5.0), images.flatten(2).transpose(1, 2)], 1)


class _FirstPixelKind(torch.nn.Module):
    """A 'classifier' naming kind 0 when the first pixel's red value is below 0 and kind 1 otherwise."""

    def forward(self, x):
        r = x[:, 0, 0, 0]
        return torch.stack([-r, r], 1)


def test_copy_scores_with_the_conditioning_transform_a_model_trained_with():
    """A centred variant is sampled with the tokens it trained on: the encoder's tokens, centred (the CLS token
    as it is), rounded to float16 as its cache stores them."""
    stub = _CopyStub()
    copying.copy_scores(stub, _FirstPixelKind(), ev=dict(pages=3, n=2, guidance=0.0, steps=4),
                        transform=lambda t: copying.centre_patches(t, 64))
    cond, _ = copying.kinds.test_conditions(3, 8)
    pix = cond.flatten(2).transpose(1, 2)
    want = torch.cat([torch.full((3, 1, 3), 5.0), pix - pix.mean(1, keepdim=True)], 1).half().float()
    assert torch.equal(stub.tokens, want)


def test_centre_patches_removes_the_shared_part_and_keeps_the_layout():
    """Worked by hand: one image, CLS [9] and patch tokens [1, 3] (mean 2) -> [9], [-1, 1]; on random tokens the
    position-shared share of the centred patches is 0 and the differences between positions are unchanged."""
    t = torch.tensor([[[9.0], [1.0], [3.0]]])
    assert torch.equal(copying.centre_patches(t, 2), torch.tensor([[[9.0], [-1.0], [1.0]]]))
    g = torch.Generator().manual_seed(0)
    tok = torch.randn(20, 1 + 16, 4, generator=g, dtype=torch.float64) + torch.randn(20, 1, 4, generator=g, dtype=torch.float64) * 3
    c = copying.centre_patches(tok, 16)
    assert token_probe.position_shared_share(c[:, 1:]) == pytest.approx(0.0, abs=1e-12)
    assert token_probe.position_shared_share(tok[:, 1:]) > 0.5
    assert torch.allclose(c[:, 2:] - c[:, 1:-1], tok[:, 2:] - tok[:, 1:-1]) and torch.equal(c[:, 0], tok[:, 0])


def test_centred_cache_is_what_train_py_reads_for_a_centred_variant(tmp_path):
    """centred_cache: the encode_cache of train.py's synthetic pages with every image's patch tokens centred
    (checked row by row against the encoder, float16), accepted by the check train.py --cond-cache makes
    (pages and encoder), its transform recorded; built once, under its final name only when complete."""
    from pages import embeddings
    import encoders
    import features
    from pages import synthetic
    images, page, _ = features.page_bank(4, features.ENCODER_PAGES_SEED)
    enc = features.train_encoder(images, page, 0, log=lambda *a: None)
    path = str(tmp_path / "enc.pth")
    encoders.save_dinov2(enc, path)
    cache = copying.centred_cache(str(tmp_path), path, num_pages=3, seed=5)
    assert not os.path.exists(cache + ".tmp")
    pages = synthetic.SyntheticPages(3, 32, seed=5)
    loaded = encoders.from_checkpoint(path)
    c = embeddings.CondCache.open(cache, pages, loaded)                 # what train.py --cond-cache checks
    assert "centre_patches" in c.meta["transform"]
    for p, i in ((0, 0), (2, pages.count(2) - 1)):
        x = pages.image(p, i)[None]
        tok = loaded(loaded.preprocess(x))[1].half().float()            # as encode_cache stores it, then centred
        want = torch.cat([tok[:, :1], tok[:, 1:] - tok[:, 1:].mean(1, keepdim=True)], 1)[0]
        assert torch.allclose(c.get(p, i), want, atol=2e-3)
        assert c.get(p, i)[1:].mean(0).abs().max() < 2e-3
    os.remove(os.path.join(cache, "tokens.npy"))                        # kept: not built again
    assert copying.centred_cache(str(tmp_path), path, num_pages=3, seed=5) == cache


def test_a_centred_variant_trains_with_train_py_and_is_scored(tmp_path):
    """End to end, shrunk: train.py --pairs same --cond-cache <centred_cache> trains (the cache passes its checks),
    its checkpoint rebuilds the encoder from the file, and copy_scores samples it on centred tokens."""
    import encoders
    import features
    import train
    images, page, _ = features.page_bank(4, features.ENCODER_PAGES_SEED)
    path = str(tmp_path / "enc.pth")
    encoders.save_dinov2(features.train_encoder(images, page, 0, log=lambda *a: None), path)
    cache = copying.centred_cache(str(tmp_path), path, num_pages=12, seed=0)
    out = tmp_path / "run"
    train.main(train.parse_args(["--pairs", "same", "--encoder-weights", path, "--cond-cache", cache, "--num-pages", "12",
                                 "--steps", "2", "--batch", "4", "--sample-steps", "2", "--grid-images", "1",
                                 "--grid-n", "1", "--device", "cpu", "--out", str(out)]))
    model = copying.semantica.Semantica.from_checkpoint(str(out / "ckpt.pt"), ema=False)
    scores, cond, samples = copying.copy_scores(model, _FirstPixelKind(), ev=dict(pages=2, n=2, guidance=0.0, steps=2),
                                                transform=copying.variant_transform("encoder0-centred"))
    assert samples.shape == (2, 2, 3, 32, 32) and 0 <= scores["agreement"] <= 1


def test_copy_scores_by_hand():
    """Claim 1's numbers of the copy part at guidance 0: RMSE to the condition is the mean over samples (0 for
    the copy, 0.1 for the offset one), RMSE between the two samples 0.1, kind agreement the share of samples
    whose first pixel stays on its condition's side of 0 (counted here by hand)."""
    stub = _CopyStub()
    ev = dict(pages=6, n=2, guidance=0.0, steps=7)
    got, cond, samples = copying.copy_scores(stub, _FirstPixelKind(), ev)
    assert stub.calls == [(2, 0.0, 7)] and samples.shape == (6, 2, 3, 8, 8)
    assert got["to_cond"] == pytest.approx(0.05, abs=1e-6) and got["between"] == pytest.approx(0.1, abs=1e-6)
    r = cond[:, 0, 0, 0]
    moved = ((r < 0) != (r + 0.1 < 0)).sum().item()                  # the offset sample crossed 0
    assert got["agreement"] == pytest.approx(1 - moved / 12)
    assert copying.COPY_EVAL["guidance"] == 0.0                         # claim 1 is judged at w = 0


def test_copy_section_quotes_the_stored_numbers(tmp_path):
    part = dict(command="python experiments/sweep.py --parts copy --lengths 600,2000", seconds=60.0, machine="m")
    rec = dict(to_cond=0.3, between=0.2, agreement=0.25)
    res = {"copy": dict(part, real_pair=0.4, rows={
        "2000": dict(train_seconds=420, reconstruction=dict(to_cond=0.12, between=0.05, agreement=0.5),
                     pages=dict(to_cond=0.4, between=0.35, agreement=0.125)),
        "600": dict(reconstruction=rec)})}
    path = tmp_path / "SWEEP.md"
    sweep.write_markdown(json.loads(json.dumps(res)), str(path))
    md = path.read_text()
    assert "| 600 | 19200 | - | 0.300 | - | - | 0.200 | - | 0.250 | - |" in md
    assert "| 2000 | 64000 | 420 | 0.120 | 0.400 | 0.30 | 0.050 | 0.350 | 0.500 | 0.125 |" in md
    assert md.index("| 600 |") < md.index("| 2000 |") and "differ by 0.400" in md


def test_copy_variants_train_one_difference_each_and_keep_their_rows(monkeypatch, tmp_path):
    """copy-variants: the reconstruction model's flags plus the claims run's encoder (or its 2048 pages), one
    run folder each; a kept length is not redone; a variant stored with another encoder file is refused."""
    trained, scored = [], []

    def fake_kept(run, steps, flags):
        trained.append((os.path.basename(run), steps, flags))
        os.makedirs(run, exist_ok=True)
        open(os.path.join(run, f"ckpt_{steps}.pt"), "wb").close()
        return 7
    monkeypatch.setattr(copying.kept_runs, "kept_run", fake_kept)
    monkeypatch.setattr(sweep.semantica.Semantica, "from_checkpoint", staticmethod(lambda p: p))
    monkeypatch.setattr(copying.kept_runs, "save_grid", lambda *a: None)

    def fake_scores(model, classifier, transform=None):
        scored.append(model)
        return dict(to_cond=0.1, between=0.2, agreement=0.3), None, None
    monkeypatch.setattr(copying, "copy_scores", fake_scores)
    monkeypatch.setattr(copying.machine, "describe", lambda: "CPU B, 2 cores")
    enc = "/x/networks/tiny_dinov2_encoder_abc.pth"
    state = copying.copy_variants(str(tmp_path), [4000, 600], None, {}, ["encoder", "pages"], enc)
    assert trained == [("copy-encoder", 600, ("--pairs", "same", "--encoder-weights", enc)),
                       ("copy-encoder", 4000, ("--pairs", "same", "--encoder-weights", enc)),
                       ("copy-pages", 600, ("--pairs", "same", "--num-pages", "2048")),
                       ("copy-pages", 4000, ("--pairs", "same", "--num-pages", "2048"))]
    assert scored[0] == str(tmp_path / "copy-encoder" / "ckpt_600.pt")
    v = state["variants"]
    assert v["encoder"]["setting"] == "tiny_dinov2_encoder_abc.pth" and v["pages"]["setting"] == "2048"
    assert v["encoder"]["what"] == "the claims run's trained encoder (tiny_dinov2_encoder_abc.pth)"
    assert v["pages"]["rows"]["4000"] == dict(train_seconds=7, machine="CPU B, 2 cores",
                                              reconstruction=dict(to_cond=0.1, between=0.2, agreement=0.3))
    trained.clear()
    moved = "/elsewhere/tiny_dinov2_encoder_abc.pth"                  # the same recipe's file in another folder
    assert copying.copy_variants(str(tmp_path), [600, 4000], None, state, ["encoder"], moved) is state and trained == []
    assert copying.copy_variants_args(state) == (" --lengths 600,4000 --variants encoder,pages "
                                               "--encoder-weights /elsewhere/tiny_dinov2_encoder_abc.pth")  # every stored row
    with pytest.raises(SystemExit, match="measured with tiny_dinov2_encoder_abc.pth, now tiny_dinov2_encoder_def.pth"):
        copying.copy_variants(str(tmp_path), [600], None, state, ["encoder"], "/x/tiny_dinov2_encoder_def.pth")


def test_copy_variant_of_encoder_training_length(monkeypatch, tmp_path):
    """encoder<N>: the claims run's encoder recipe trained N steps (kept in OUT/networks) swapped in; rows stored
    before rows named their machine take the machine of the invocation that stored them."""
    trained, made = [], []
    monkeypatch.setattr(copying.kept_runs, "kept_run", lambda run, steps, flags: trained.append((os.path.basename(run), flags)) or 5)
    monkeypatch.setattr(sweep.semantica.Semantica, "from_checkpoint", staticmethod(lambda p: p))
    monkeypatch.setattr(copying.kept_runs, "save_grid", lambda *a: None)
    monkeypatch.setattr(copying, "copy_scores", lambda m, c, **k: (dict(to_cond=0.2, between=0.2, agreement=0.5), None, None))
    monkeypatch.setattr(copying.machine, "describe", lambda: "CPU B, 2 cores")

    def fake_pretrained(out_dir, name, steps, bank_pages, seed=0, log=print, patch_size=4):
        made.append((out_dir, name, steps, bank_pages, seed, patch_size))
        return f"/n/tiny_dinov2_encoder_{steps}x.pth"
    monkeypatch.setattr(copying.features, "pretrained_network", fake_pretrained)
    old = dict(to_cond=0.3, between=0.3, agreement=0.1)
    state = dict(machine="CPU A, 2 cores", variants={"encoder": dict(setting="e.pth", what="E", rows={
        "4000": dict(train_seconds=9, reconstruction=old)})})
    copying.copy_variants(str(tmp_path), [4000], None, state, ["encoder30"])
    cc = copying.ClaimsConfig()
    assert made == [(str(tmp_path / "networks"), "encoder", 30, cc.bank_pages, cc.seed, 4)]
    assert trained == [("copy-encoder30", ("--pairs", "same", "--encoder-weights", "/n/tiny_dinov2_encoder_30x.pth"))]
    v = state["variants"]
    assert v["encoder30"]["what"] == "the claims run's encoder recipe trained 30 steps (tiny_dinov2_encoder_30x.pth)"
    assert v["encoder30"]["rows"]["4000"]["machine"] == "CPU B, 2 cores"
    assert v["encoder"]["rows"]["4000"]["machine"] == "CPU A, 2 cores"      # stored by the earlier invocation
    assert copying.copy_variants_args(state) == " --lengths 4000 --variants encoder,encoder30 --encoder-weights e.pth"
    state["variants"]["encoder5"] = dict(rows={"600": {}})
    assert copying.copy_variants_args(state) == (" --lengths 600,4000 --variants encoder,encoder5,encoder30 "
                                                 "--encoder-weights e.pth")          # encoder<N> by N, not as stored
    assert [(copying.variant_recipe(n) or (None,))[0] for n in ("encoder0", "encoder250", "encoder", "pages",
                                                                "encoderx")] == [0, 250, None, None, None]


def test_copy_variant_names_of_the_encoder_recipe():
    """The grammar of the encoder-recipe variants (N steps, patch size P; the copy part's encoder is (0, 4)), one
    name per variant (no leading zeros, no other separators), and the table's order: the recipes at patch 4 by
    N, then by patch size."""
    want = {"encoder0": (0, 4, False), "encoder250": (250, 4, False), "patch8": (0, 8, False), "patch2": (0, 2, False),
            "encoder10-patch8": (10, 8, False), "encoder0-patch16": (0, 16, False), "encoder250-centred": (250, 4, True),
            "patch8-centred": (0, 8, True), "encoder10-patch2-centred": (10, 2, True)}
    for name in ("encoder", "pages", "encoderx", "encoder-5", "encoder05", "patch08", "patch", "-patch8",
                 "encoder-patch8", "encoder10patch8", "encoder10-", "patch8-encoder10", "Patch8", "", "centred",
                 "encoder-centred", "pages-centred", "encoder10-centred-patch8", "encoder10centred", "encoder10-centered"):
        want[name] = None
    assert {n: copying.variant_recipe(n) for n in want} == want
    names = ["patch16", "encoder10-patch8", "pages", "patch8", "encoder100", "encoder", "encoder30", "patch2",
             "encoder30-centred", "encoder10-centred"]
    assert sorted(names, key=copying.variant_order) == \
        ["encoder", "pages", "encoder10-centred", "encoder30", "encoder30-centred", "encoder100", "patch2", "patch8",
         "encoder10-patch8", "patch16"]
    assert copying.variant_what("encoder250-centred", "f.pth") == ("the claims run's encoder recipe trained 250 steps, "
                                                                   "patch tokens centred on the image's mean patch token (f.pth)")
    assert copying.variant_what("patch8", "f.pth") == "the random encoder, patch size 8 (16 patch tokens) (f.pth)"
    assert copying.variant_what("encoder10-patch2", "f.pth") == \
        "the claims run's encoder recipe trained 10 steps, patch size 2 (256 patch tokens) (f.pth)"
    assert copying.variant_what("encoder30", "f.pth") == "the claims run's encoder recipe trained 30 steps (f.pth)"


def test_copy_variant_at_another_patch_size_trains_with_that_encoder(monkeypatch, tmp_path):
    """patch<P>: the recipe's random encoder at patch size P, passed to train.py as a file it builds the
    encoder from (no preset has that shape); a patch size that does not divide 32 px is refused."""
    trained, made = [], []
    monkeypatch.setattr(copying.kept_runs, "kept_run", lambda run, steps, flags: trained.append((os.path.basename(run), flags)) or 5)
    monkeypatch.setattr(sweep.semantica.Semantica, "from_checkpoint", staticmethod(lambda p: p))
    monkeypatch.setattr(copying.kept_runs, "save_grid", lambda *a: None)
    transforms = []
    monkeypatch.setattr(copying, "copy_scores", lambda m, c, transform=None: transforms.append(transform) or (
        dict(to_cond=0.2, between=0.2, agreement=0.5), None, None))
    monkeypatch.setattr(copying, "centred_cache", lambda net_dir, path: path + ".centred")

    def fake_pretrained(out_dir, name, steps, bank_pages, seed=0, log=print, patch_size=4):
        made.append((name, steps, patch_size))
        return f"/n/enc_{steps}_{patch_size}.pth"
    monkeypatch.setattr(copying.features, "pretrained_network", fake_pretrained)
    state = {}
    copying.copy_variants(str(tmp_path), [4000], None, state, ["patch8", "encoder10-patch2", "encoder10-centred"])
    assert made == [("encoder", 0, 8), ("encoder", 10, 2), ("encoder", 10, 4)]
    assert trained == [("copy-patch8", ("--pairs", "same", "--encoder-weights", "/n/enc_0_8.pth", "--encoder", "dinov2-custom")),
                       ("copy-encoder10-patch2", ("--pairs", "same", "--encoder-weights", "/n/enc_10_2.pth",
                                                  "--encoder", "dinov2-custom")),
                       ("copy-encoder10-centred", ("--pairs", "same", "--encoder-weights", "/n/enc_10_4.pth",
                                                   "--cond-cache", "/n/enc_10_4.pth.centred"))]
    assert transforms[:2] == [None, None]                          # a centred model is scored on centred tokens
    tok = torch.randn(2, 65, 3)
    assert torch.equal(transforms[2](tok), copying.centre_patches(tok, 64))
    assert state["variants"]["patch8"]["setting"] == "enc_0_8.pth"
    assert copying.copy_variants_args(state) == \
        " --lengths 4000 --variants encoder10-centred,encoder10-patch2,patch8"   # patch 4 first, then by patch size
    for argv in (["--parts", "copy-variants", "--variants", "patch3"], ["--parts", "copy-variants", "--variants", "patch0"],
                 ["--parts", "copy-variants", "--variants", "encoder5-patch64"]):
        with pytest.raises(SystemExit) as e:
            sweep.main(argv)
        assert e.value.code == 2, argv


def test_tiny_encoder_at_another_patch_size_round_trips_through_its_file(tmp_path):
    """features.tiny_config(P): (32 / P)^2 patch tokens + CLS; the recipe's untrained encoder at P = 8, written in
    the DINOv2 layout, is rebuilt by encoders.from_checkpoint (as train.py --encoder-weights does) with the same
    tokens; P = 4 is the preset, and P must divide 32."""
    import encoders
    import features
    assert features.tiny_config(4) == encoders.ENCODER_PRESETS["tiny"]
    for bad in (0, 3, 5, 64, "8", 4.0):
        with pytest.raises(ValueError, match="patch size must divide"):
            features.tiny_config(bad)
    images, page, _ = features.page_bank(4, features.ENCODER_PAGES_SEED)
    enc = features.train_encoder(images, page, 0, log=lambda *a: None, patch_size=8)
    path = str(tmp_path / "e.pth")
    encoders.save_dinov2(enc, path)
    back = encoders.from_checkpoint(path)
    assert (back.name, back.patch_size, back.image_size) == ("dinov2-custom", 8, 32)
    x = images[:3]
    g, tok = back(back.preprocess(x))
    assert tok.shape == (3, 1 + 4 * 4, 128)
    assert torch.equal(tok, enc(enc.preprocess(x))[1])
    assert tuple(back.state_dict()["patch_embed.proj.weight"].shape) == (128, 3, 8, 8)   # 8 x 8 x 3 per token


def test_probe_rows_at_other_patch_sizes(monkeypatch, tmp_path, capsys):
    """--encoder-patches: the probe adds the random encoder at each patch size, with (32 / P)^2 + 1 tokens of 128
    dims (the --encoder-steps recipes stay at patch 4); sizes that do not divide 32 are refused in one line."""
    import features
    calls = []
    real = features.pretrained_network

    def spy(out_dir, name, steps, bank_pages, seed=0, log=print, patch_size=4):
        calls.append((steps, patch_size))
        return real(out_dir, name, 0, 4, seed, log, patch_size)      # (untrained, few pages: only shapes matter)
    monkeypatch.setattr(features, "pretrained_network", spy)
    out = token_probe.probe(None, (3,), str(tmp_path), n_train=40, n_test=20, ranks=(4,), log=lambda *a: None,
                            patches=(8, 4))
    assert calls == [(3, 4), (0, 8)]
    low = out["lowrank"]
    assert low["random tiny encoder, patch 8, tokens"]["dims"] == (1 + 16) * 128
    assert low["claims' encoder recipe, 3 steps, tokens"]["dims"] == (1 + 64) * 128
    assert low["random tiny encoder (default job), tokens"]["dims"] == (1 + 64) * 128
    assert 0 < low["random tiny encoder, patch 8, tokens"]["position_shared"] < 1
    assert "random tiny encoder, patch 8, global" in out["results"]
    for bad in ("3", "x", "0"):
        with pytest.raises(SystemExit) as e:
            sweep.main(["--parts", "probe", "--encoder-patches", bad])
        assert e.value.code == 2 and "--encoder-patches" in capsys.readouterr().err


def test_encoder_file_names_keep_their_recipe_hash(monkeypatch, tmp_path):
    """The default patch size leaves the recipe (and so the file name) as before patch sizes existed: the claims
    run's encoder is still tiny_dinov2_encoder_8b9d5dc466.pth (the name RESULTS.md quotes); another patch size is
    another file; a features network has no patch size."""
    import features
    monkeypatch.setattr(features, "train_encoder", lambda *a, patch_size, **k: features.encoders.random_encoder(
        features.tiny_config(patch_size), "x"))                     # (no training: only the names are checked)
    monkeypatch.setattr(features, "page_bank", lambda *a, **k: (None, None, None))
    cc = copying.ClaimsConfig()
    path = features.pretrained_network(str(tmp_path), "encoder", cc.encoder_steps, cc.bank_pages, cc.seed, log=lambda *a: None)
    assert os.path.basename(path) == "tiny_dinov2_encoder_8b9d5dc466.pth"
    other = features.pretrained_network(str(tmp_path), "encoder", cc.encoder_steps, cc.bank_pages, cc.seed,
                                        log=lambda *a: None, patch_size=8)
    assert os.path.basename(other) != os.path.basename(path)
    assert json.load(open(other + ".json"))["patch_size"] == 8
    with pytest.raises(ValueError, match="no patch size"):
        features.pretrained_network(str(tmp_path), "features", 1, 4, patch_size=8)
    with pytest.raises(ValueError, match="patch size must divide"):
        features.pretrained_network(str(tmp_path), "encoder", 1, 4, patch_size=6)


def test_copy_variants_section_puts_each_length_beside_the_copy_part(tmp_path):
    part = dict(command="python experiments/sweep.py --parts copy-variants --lengths 4000", seconds=60.0,
                machine="CPU A, 2 cores")
    res = {"copy": dict(part, real_pair=0.4, rows={"4000": dict(train_seconds=600, reconstruction=dict(
               to_cond=0.056, between=0.04, agreement=1.0)), "600": dict(reconstruction=dict(
               to_cond=0.3, between=0.3, agreement=0.1))}),
           "copy-variants": dict(part, variants={"encoder": dict(what="E", setting="enc.pth", rows={"4000": dict(
               train_seconds=900, reconstruction=dict(to_cond=0.33, between=0.3, agreement=0.135))}),
               "encoder30": dict(what="F", setting="f.pth", rows={"4000": dict(
                   train_seconds=800, machine="CPU B, 2 cores", reconstruction=dict(
                       to_cond=0.06, between=0.05, agreement=0.9))})})}
    v = res["copy-variants"]["variants"]
    res["copy-variants"]["variants"] = dict(reversed(list(v.items())))   # stored encoder30 first: the table sorts
    path = tmp_path / "SWEEP.md"
    sweep.write_markdown(json.loads(json.dumps(res)), str(path))
    md = path.read_text()
    table = md[md.index("## What keeps"):]
    assert "| 4000 | copy part (random encoder) | 600 (CPU A) | 0.056 | 0.040 | 1.000 |" in table
    assert "| 4000 | encoder: E | 900 (CPU A) | 0.330 | 0.300 | 0.135 |" in table
    assert "| 4000 | encoder30: F | 800 (CPU B) | 0.060 | 0.050 | 0.900 |" in table
    assert table.index("| encoder: E |") < table.index("| encoder30: F |")
    assert "\n| 600 |" not in table and "512 training pages" in table     # lengths no variant has stay in the copy table


def test_copy_variants_arguments(capsys):
    for argv, msg in ((["--parts", "copy-variants", "--variants", "encoder"], "needs --encoder-weights"),
                      (["--parts", "copy-variants", "--variants", "pages,colour"], "--variants must be"),
                      (["--parts", "copy-variants", "--variants", ","], "--variants must be"),
                      (["--parts", "copy-variants", "--variants", "encoderx"], "--variants must be"),
                      (["--parts", "copy-variants", "--variants", "encoder-5"], "--variants must be")):
        with pytest.raises(SystemExit) as e:
            sweep.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err, argv
