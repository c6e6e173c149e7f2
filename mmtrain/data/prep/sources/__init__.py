"""Source listings: turn a raw dataset into candidates, one module per input kind."""
