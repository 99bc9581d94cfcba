"""The Tinker training API's state (issue 21): sessions, request-driven models and their
requests as rows, and the dispatcher that hands those rows to pack hosts."""
