"""Task modules, one per family; each task is named txmon.<family>.<action>."""
