// Stand-in for a Gloo header the torch wheel does not ship (see the README beside it).
#pragma once
#include "gloo/context.h"
