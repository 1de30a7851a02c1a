"""Output formats: flat rows, CSV, JSON and rich tables. Formatters return text."""
