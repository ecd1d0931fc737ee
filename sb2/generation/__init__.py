"""One-step generation, interpolation, image grids and export to a stock diffusers pipeline."""
