"""minidistill: the package behind the knowledge-distillation course.

Modules: ``runtime`` (profile, device, seeding), ``data`` (data sets, device loader),
``models`` (CIFAR ResNets, WRNs, feature access), ``losses`` (distillation primitives and
objectives), ``train`` (fit, evaluate, cached teachers), ``distributed`` (several GPUs under
torchrun), ``metrics``, ``plots``, and
``methods.<paper>`` for each chapter.
"""
__version__ = "0.1.0"
__all__ = ["__version__"]
