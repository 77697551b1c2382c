"""Worker for tests/bridge/jax_model/test_mesh.py, run as its own process (the device count
and `jax.distributed` must be set before JAX starts).

    python mesh_worker.py devices OUT               4 simulated devices: mesh of 1 vs 4
    python mesh_worker.py ref OUT                   one device, the whole batches
    python mesh_worker.py process I PORT OUT        process I of 2 (2 devices each), half of each batch
"""

import os
import sys

mode = sys.argv[1]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={2 if mode == 'process' else 4}"
import jax  # noqa: E402

if mode == "process":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{sys.argv[3]}", num_processes=2, process_id=int(sys.argv[2])
    )

import numpy as np  # noqa: E402

import jaxq  # noqa: E402
from bridge import Calibrator  # noqa: E402
from bridge.evaluation import protocols  # noqa: E402
from jaxq.sharding import ShardingError, data_mesh  # noqa: E402

METHODS = (0, 1, 2)  # sigma, min-max, histogram


def records(calib, mesh, method, **cfg):
    p = protocols.digits()
    cfg = {"w_bit": 8, **cfg}
    cal = Calibrator(
        p.make_model(), jaxq.QuantConfig(a_bit=8, act_method=method, **cfg), calib, progress=False, mesh=mesh
    )
    return cal.run().records


def flat(recs, method):
    out = {}
    for name, r in recs.items():
        out[f"{method}/{name}/input_scale"] = np.asarray(r.input_scale)
        out[f"{method}/{name}/input_offset"] = np.asarray(r.input_offset)
        out[f"{method}/{name}/weight_scale"] = np.asarray(r.weight_scale)
        out[f"{method}/{name}/codes"] = np.asarray(r.codes)
    return out


def main():
    data = protocols.digits().calib_data
    out = {}
    if mode == "devices":
        one, four = data_mesh(jax.devices()[:1]), data_mesh(jax.devices())
        for method in METHODS:
            out.update({f"one/{k}": v for k, v in flat(records(data, one, method), method).items()})
            out.update({f"four/{k}": v for k, v in flat(records(data, four, method), method).items()})
        brecq = dict(w_bit=4, keep_acc={"brecq": [True, 20]})
        one_b = records(data, one, 1, **brecq)
        four_b = records(data, four, 1, **brecq)
        out["brecq_codes_one"] = np.concatenate([r.codes.ravel() for r in one_b.values()])
        out["brecq_codes_four"] = np.concatenate([r.codes.ravel() for r in four_b.values()])
        easy = dict(keep_acc={"easy_quant": [True, 1000]})
        out.update({f"one/{k}": v for k, v in flat(records(data, one, 1, **easy), "easy").items()})
        out.update({f"four/{k}": v for k, v in flat(records(data, four, 1, **easy), "easy").items()})
        out.update({f"torch/{k}": v for k, v in flat(records(data, None, 1, **easy), "easy").items()})
        admm = dict(keep_acc={"admm": [True, 100]})
        out.update({f"one/{k}": v for k, v in flat(records(data, one, 1, **admm), "admm").items()})
        out.update({f"four/{k}": v for k, v in flat(records(data, four, 1, **admm), "admm").items()})
        from bridge.jax_model import isolated_sensitivity

        p = protocols.digits()
        cal = Calibrator(p.make_model(), jaxq.QuantConfig(w_bit=8, a_bit=8), data, progress=False, mesh=four).run()
        batches = cal.calibration_batches(64)
        single = isolated_sensitivity(cal.jax_forward(), batches)
        split = isolated_sensitivity(cal.jax_forward(), batches, mesh=four)
        out["sensitivity_one"] = np.array([single[n] for n in single])
        out["sensitivity_four"] = np.array([split[n] for n in single])
        from jaxq.calibrate import quantize_weight_bucket
        from jaxq.sharding import _sharded_cached, bind, layers_over, over_layers

        ws = np.random.default_rng(0).normal(size=(5, 16, 32)).astype(np.float32)
        scheme = jaxq.QScheme(bits=4, signed=True, symmetric=True, axis=0)
        with layers_over(four):
            sharded = over_layers(bind(quantize_weight_bucket, scheme=scheme), ws)
        direct = quantize_weight_bucket(ws, scheme)
        out["over_layers_equal"] = np.array(
            np.array_equal(sharded.q, direct.q) and np.array_equal(sharded.qparams.scale, direct.qparams.scale)
        )
        out["sharded_programs"] = np.array(_sharded_cached.cache_info().currsize)
        try:
            records([b[:6] for b in data], four, 1)
            out["uneven_error"] = np.array("")
        except ShardingError as e:
            out["uneven_error"] = np.array(str(e))
    elif mode == "ref":
        mesh = data_mesh(jax.devices()[:1])
        for method in METHODS:
            out.update(flat(records(data, mesh, method), method))
    else:
        i = jax.process_index()
        half = [b[i * (len(b) // 2) : (i + 1) * (len(b) // 2)] for b in data]
        mesh = data_mesh()
        assert mesh.size == 4 and len(mesh.local_devices) == 2
        for method in METHODS:
            out.update(flat(records(half, mesh, method), method))
    np.savez(sys.argv[-1], **out)


if __name__ == "__main__":
    main()
