"""Pure numerics: weight matrices in, eigenvalues, power-law fits and layer metrics out."""
