"""re2tal.tuning"""
