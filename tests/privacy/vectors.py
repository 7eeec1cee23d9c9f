"""Known values shared by the accountant tests: per-step sampled-Gaussian RDP from specs/dpis.md §2.6."""

#: (q, sigma, order, RDP of one step of the Poisson-subsampled Gaussian)
SGM_SPEC_VECTORS = [
    (0.01, 1.0, 2, 1.718134e-04),
    (0.01, 1.0, 8, 8.936439e-04),
    (0.01, 1.0, 32, 1.124628e+01),
    (0.05, 2.0, 4, 1.462563e-03),
    (0.05, 2.0, 10.5, 4.286260e-03),
    (0.1, 0.8, 3, 9.505854e-02),
    (1.0, 1.0, 2, 1.0),
]
