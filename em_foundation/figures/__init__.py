"""The paper's figures, regenerated from the workflow's own tables."""
