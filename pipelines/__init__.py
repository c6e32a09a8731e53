"""Kubeflow pipeline definitions of sonossl: ``training`` and ``monitoring`` (compile with ``sonossl pipeline
compile`` or ``kfp dsl compile --py pipelines/training.py --output training.yaml``).

    from sonossl.kubeflow.pipelines.training import training
    from kfp import compiler;  compiler.Compiler().compile(training, "training.yaml")
"""
