"""re2tal.evaluation"""
