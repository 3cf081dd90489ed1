"""inferbox export pipeline: a model the customer has -> a validated, signed package."""
