"""Coverage-guided fuzzing of doqproxy's parsers with atheris (``make fuzz``)."""
