"""Information-matrix analysis: curvature operators, spectra, their database."""
