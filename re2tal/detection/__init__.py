"""re2tal.detection"""
