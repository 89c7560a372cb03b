"""re2tal.bench"""
