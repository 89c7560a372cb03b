"""re2tal.backbones"""
