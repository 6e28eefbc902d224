"""fleet's discrete-event simulator: the real policies at full scale, on virtual time.

``load_scenario(path)`` reads a scenario (a fleet spec plus workload, failures and
chaos), ``simulate(scenario)`` runs it and returns the report; ``Simulation`` gives
access to the run's state and accepts ``Component`` hooks for further policies.
No Ray needed.
"""

from fleet.sim.components import Component
from fleet.sim.engine import SimAgent, Simulation, simulate
from fleet.sim.live import simulate_fleet
from fleet.sim.report import build_report, report_json, write_plots
from fleet.sim.scenario import Scenario, ScenarioError, load_scenario, parse_scenario

__all__ = [
    "Component",
    "Scenario",
    "ScenarioError",
    "SimAgent",
    "Simulation",
    "build_report",
    "load_scenario",
    "parse_scenario",
    "report_json",
    "simulate",
    "simulate_fleet",
    "write_plots",
]
