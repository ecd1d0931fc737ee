"""Kubeflow Pipelines v2 components, one per sb2 stage; see stages.py."""
