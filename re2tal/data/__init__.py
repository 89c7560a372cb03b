"""re2tal.data"""
