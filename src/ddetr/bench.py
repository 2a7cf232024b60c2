"""Benchmarks: ``python -m ddetr.bench op ...`` (the attention op, ``ddetr.benchmarks.op``),
``python -m ddetr.bench model ...`` (the whole detector against transformers, ``ddetr.benchmarks.model``)
``python -m ddetr.bench step ...`` (operators, host reads and saved activations of one train step,
``ddetr.benchmarks.step_census``), ``python -m ddetr.bench data ...`` (start-up, memory and loader
speed of the training data, ``ddetr.benchmarks.data``), ``python -m ddetr.bench infer ...`` (batch-1 latency
of every deployment path: PyTorch, onnxruntime, OpenVINO, int8, ``ddetr.benchmarks.infer``) ``python -m ddetr.bench parts ...`` (the parts
of a CPU train step against a baseline revision, ``ddetr.benchmarks.step_parts``) and ``python -m ddetr.bench
keys`` (the CUDA graph keys of ``model.compile=reduce-overhead``, ``ddetr.benchmarks.graph_keys``)."""

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["step"]:
        from ddetr.benchmarks.step_census import main as step_main

        return step_main(argv[1:])
    if argv[:1] == ["data"]:
        from ddetr.benchmarks.data import main as data_main

        return data_main(argv[1:])
    if argv[:1] == ["keys"]:
        from ddetr.benchmarks.graph_keys import main as keys_main

        return keys_main(argv[1:])
    if argv[:1] == ["parts"]:
        from ddetr.benchmarks.step_parts import main as parts_main

        return parts_main(argv[1:])
    if argv[:1] == ["infer"]:
        from ddetr.benchmarks.infer import main as infer_main

        return infer_main(argv[1:])
    if argv[:1] == ["model"]:
        from ddetr.benchmarks.model import main as model_main

        return model_main(argv[1:])
    from ddetr.benchmarks.op import main as op_main

    return op_main(argv)


if __name__ == "__main__":
    sys.exit(main())
