"""Train states, compiled steps and the stage loop."""
