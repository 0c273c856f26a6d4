"""domainlm: turn a pile of domain documents into a better small encoder model, fast."""

__version__ = "0.1.0"
