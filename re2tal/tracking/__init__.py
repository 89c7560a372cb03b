"""re2tal.tracking"""
