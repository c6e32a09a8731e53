"""The two pretext tasks of Jiao et al. (ISBI 2020): clip order correction and geometric transform prediction."""
