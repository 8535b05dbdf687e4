"""The command-line layer the scripts share: flag types and checks, one-line errors. The only package that imports
click."""
