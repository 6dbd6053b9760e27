// Command hot is the CLI of the hot project. The files in this package only parse flags,
// call into the packages that do the work, and print; no logic lives here.
package main
