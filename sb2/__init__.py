"""sb2: a training system for SwiftBrush v2 one-step text-to-image distillation."""

__version__ = "0.1.0"
