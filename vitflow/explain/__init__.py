"""Explanations: rollout math (`rollout`), attention capture (`capture`), heatmaps (`heatmaps`), drawing (`figures`)."""
