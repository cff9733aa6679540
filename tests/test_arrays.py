"""jacobians.zarr at real size: grad and activation stored once each, attribution formed on read,
kept-bits rounding with a bounded error, and labelled dimensions that xarray opens."""

import numpy as np
import pytest
import zarr

from storage.arrays import attribution, create_jacobians, open_jacobians, write_activation, write_rows


def _gradients(rng, shape):
    # gradients span orders of magnitude, as real ones do
    return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 0, shape)).astype(np.float32)


def _stored_bytes(path) -> int:
    import os

    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if "/grad/c" in os.path.join(d, f).replace(os.sep, "/"))


@pytest.mark.parametrize("keepbits", [None, 10, 7, 4])
def test_kept_bits_bound_the_error_and_attribution_is_formed_on_read(tmp_path, keepbits):
    rng = np.random.default_rng(0)
    n_t, n_layers, d = 6, 4, 512
    path = str(tmp_path / "j.zarr")
    g = create_jacobians(path, [f"L3-{i}" for i in range(n_t)], ["safe", "risky"], n_layers, d, {"safe": 5},
                         keepbits=keepbits, writer="L3-batch0")
    grad = np.full((n_t, 2, n_layers, d), np.nan, np.float32)
    grad[:, :, :3] = _gradients(rng, (n_t, 2, 3, d))
    act = np.abs(rng.standard_normal((2, 3, d))).astype(np.float32) * (rng.random((2, 3, d)) < 0.1)
    write_rows(g, list(range(n_t)), grad)
    write_activation(g, act)
    g = open_jacobians(path, mode="r")
    got = g["grad"][:]
    assert np.isnan(got[:, :, 3:]).all()
    rel = np.abs(got[:, :, :3] - grad[:, :, :3]) / np.abs(grad[:, :, :3])
    if keepbits is None:
        assert (got[:, :, :3] == grad[:, :, :3]).all()  # lossless
    else:
        assert rel.max() <= 2.0 ** -(keepbits + 1)  # round to nearest: half a unit in the last kept bit
        assert rel.max() > 2.0 ** -(keepbits + 3)  # and it did round
    want = -got * np.concatenate([act, np.full((2, 1, d), np.nan, np.float32)], axis=1)[None]
    a = attribution(g)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(want))
    np.testing.assert_allclose(a[~np.isnan(a)], want[~np.isnan(want)], rtol=2.0 ** -(keepbits or 23))
    np.testing.assert_allclose(attribution(g, [1, 4]), a[[1, 4]], rtol=0)
    assert g.attrs["keepbits"] == keepbits and g.attrs["positions"] == {"safe": 5}


def test_fewer_kept_bits_store_fewer_bytes(tmp_path):
    rng = np.random.default_rng(1)
    grad = _gradients(rng, (8, 2, 4, 4096))
    size = {}
    for bits in (None, 10, 7):
        path = str(tmp_path / f"j{bits}.zarr")
        g = create_jacobians(path, [f"L5-{i}" for i in range(8)], ["safe", "risky"], 4, 4096, keepbits=bits)
        write_rows(g, list(range(8)), grad)
        size[bits] = _stored_bytes(path)
    raw = grad.nbytes
    assert size[None] > 0.85 * raw  # float32 gradients barely compress losslessly
    assert size[7] < 0.6 * size[None] and size[7] < size[10] < size[None]


def test_xarray_opens_it_labelled(tmp_path):
    xr = pytest.importorskip("xarray")
    path = str(tmp_path / "j.zarr")
    targets = ["L2-7", "L3-9"]
    g = create_jacobians(path, targets, ["safe", "risky"], 4, 32, keepbits=None)
    grad = np.full((2, 2, 4, 32), np.nan, np.float32)
    grad[0, :, :2] = 1.5
    grad[1, :, :3] = -2.0
    write_rows(g, [0, 1], grad)
    write_activation(g, np.ones((2, 3, 32), np.float32))
    ds = xr.open_zarr(path)
    assert ds["grad"].dims == ("target", "prompt", "layer", "feature")
    assert ds["activation"].dims == ("prompt", "layer", "feature")
    assert list(ds["target"].values) == targets and list(ds["prompt"].values) == ["safe", "risky"]
    assert list(ds["layer"].values) == [0, 1, 2, 3] and ds.sizes["feature"] == 32
    attr = -ds["grad"] * ds["activation"]  # broadcast by name
    assert float(attr.sel(target="L3-9", prompt="risky", layer=2, feature=5)) == 2.0
    np.testing.assert_array_equal(attr.transpose("target", "prompt", "layer", "feature").values,
                                  attribution(open_jacobians(path, mode="r")))
    assert zarr.open_group(path, mode="r")["grad"].metadata.dimension_names == ("target", "prompt", "layer",
                                                                                "feature")


def test_large_json_is_written_compact_and_small_json_indented(tmp_path):
    import json

    from storage.store import Store

    run = Store(str(tmp_path / "store")).run("20261201-000000-abcdef")
    small, large = {"a": [1, 2]}, {"rows": [{"feature": f"L1-{i}", "value": i / 7} for i in range(40000)]}
    run.write_json("small.json", small)
    run.write_json("large.json", large)
    text = run.read_bytes("large.json").decode()
    assert json.loads(text) == large and "\n  " not in text and len(text) > 1 << 20
    small_text = run.read_bytes("small.json").decode()
    assert json.loads(small_text) == small and "\n  " in small_text
    with pytest.raises(ValueError):
        run.write_json("nan.json", {"x": float("nan")})


def test_rows_are_rounded_only_where_computed(tmp_path):
    """write_rows(valid_layers=L) rounds the layers below the rows' target layer and stores NaN above,
    exactly as rounding the whole rows would (issue 19: no rounding work on the NaN layers)."""
    rng = np.random.default_rng(1)
    grad = rng.standard_normal((2, 2, 4, 32)).astype(np.float32)
    grad[:, :, 2:] = np.nan
    a = create_jacobians(zarr.storage.LocalStore(str(tmp_path / "a")), ["L2-1", "L2-2"], ["safe", "risky"], 4, 32,
                         keepbits=7)
    b = create_jacobians(zarr.storage.LocalStore(str(tmp_path / "b")), ["L2-1", "L2-2"], ["safe", "risky"], 4, 32,
                         keepbits=7)
    c = create_jacobians(zarr.storage.LocalStore(str(tmp_path / "c")), ["L2-1", "L2-2"], ["safe", "risky"], 4, 32,
                         keepbits=7)
    write_rows(a, [0, 1], grad, valid_layers=2)
    write_rows(b, [0, 1], grad)
    write_rows(c, [0, 1], np.ascontiguousarray(grad[:, :, :2]))  # phase A's: the computed layers only
    np.testing.assert_array_equal(a["grad"][:], b["grad"][:])
    np.testing.assert_array_equal(c["grad"][:], b["grad"][:])
    assert np.isnan(a["grad"][:, :, 2:]).all() and np.isfinite(a["grad"][:, :, :2]).all()
    assert not np.array_equal(a["grad"][:, :, :2], grad[:, :, :2])  # rounded


def test_graph_weights_are_rounded_but_the_targets_values_stay_exact(tmp_path):
    """A contrast subtracts the two prompts' target values: they are kept to float32, the weights to keepbits."""
    from storage.arrays import write_contrast, write_prompt_graph

    rng = np.random.default_rng(0)
    value = rng.normal(size=3).astype(np.float32) * 10
    weight = rng.normal(size=(3, 5)).astype(np.float32)
    g = write_prompt_graph(zarr.storage.LocalStore(str(tmp_path / "g.zarr")), "risky", ["a", "b", "c"],
                           {"value": value, "weight": weight}, {"position": 4}, keepbits=4)
    assert np.array_equal(g["value"][:], value)
    assert not np.array_equal(g["weight"][:], weight)
    assert np.allclose(g["weight"][:], weight, rtol=2.0**-4)
    assert g["value"].metadata.dimension_names == ("target",)
    c = write_contrast(zarr.storage.LocalStore(str(tmp_path / "c.zarr")),
                       {"heatmap": np.ones((2, 3, 4), np.float32)},
                       {"direction": ["risky", "safe"], "layer": ["embeddings", "L0", "L1"], "span": list("wxyz")}, {})
    assert c["heatmap"].metadata.dimension_names == ("direction", "layer", "span")
    assert c["heatmap"].attrs["labels"]["span"] == list("wxyz")
