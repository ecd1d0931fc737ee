"""Training: the prompt data, the two schemes (full, lora) and the alternating VSD / LoRA-teacher loop."""
