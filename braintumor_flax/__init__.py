"""braintumor-flax: view-plane and tumour classification of 2-D brain MRI slices in Flax NNX."""

__version__ = "0.1.0"
