"""The method's math: pure functions over tensors (VSD, LoRA-teacher loss, clamped CLIP loss, schedules)."""
