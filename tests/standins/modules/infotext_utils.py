"""Stand-in of modules/infotext_utils.py (v1.10.1): `parse_generation_parameters` reads the last infotext line as
`key: value` pairs, JSON-quoted values unquoted (:234-280), and calls nothing else. Written for the tests."""
import json


def _pairs(line):
    i, n = 0, len(line)
    while i < n:
        j = line.find(":", i)
        if j < 0:
            return
        key = line[i:j].strip()
        i = j + 1
        while i < n and line[i] == " ":
            i += 1
        if i < n and line[i] == '"':
            value, end = json.JSONDecoder().raw_decode(line, i)
            i = end
            k = line.find(",", i)
            i = n if k < 0 else k + 1
        else:
            k = line.find(",", i)
            value = (line[i:] if k < 0 else line[i:k]).strip()
            i = n if k < 0 else k + 1
        yield key, value


def parse_generation_parameters(text):
    lines = text.strip().split("\n")
    res = {"Prompt": lines[0]}
    for key, value in _pairs(lines[-1]):
        res[key] = value
    return res
