"""Know your data and your model: duplicates and leaks between splits, likely label errors."""
